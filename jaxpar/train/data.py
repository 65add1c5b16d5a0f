"""Deterministic, checkpointable batches of packed token rows, built on grain.

The pipeline is: files -> documents -> train/eval split -> chunks of at most `seq_len` input/target
pairs -> (shuffle, repeat) -> read -> first-fit packing into rows -> global batch -> this process's rows.

Everything up to "read" is a table computed from file sizes alone, so building an iterator costs a
directory walk and a few `stat` calls, and tokens are read lazily (memory mapped) only for the chunks a
batch needs. Because every stage before packing is an index lookup in a grain `MapDataset`, the
iterator's state is a handful of integers: JSON-serialisable, and restoring it replays exactly the same
batches.

Documents: for `stdlib` and `text` each file is one document of byte tokens, or, with a real tokenizer
(data.tokenizer), of its ids followed by EOS, tokenized in memory when the iterator is built (for corpora
of more than a few hundred MB, prepare them once with scripts/prepare_data.py instead). A `tokens` file is
a flat stream with no document boundaries we could know about, so it is cut into documents of
`TOKEN_DOC_LEN` tokens; this gives the train/eval split something finer than whole files to work with
(a corpus is often a single file). A document of L tokens has L - 1 next-token pairs; it is cut into
chunks of `seq_len` pairs (seq_len + 1 tokens, consecutive chunks share one token, so no pair is lost)
plus a shorter remainder, and each chunk becomes its own segment in a packed row.

Split: documents are ranked by a hash of a stable name (path relative to the corpus root, plus block
index for `tokens`); the lowest `eval_fraction` of them, at least one and never all, form `eval`. The
split ignores `seed`, so evaluation losses stay comparable across runs.

Prepared corpora (data.path a directory written by scripts/prepare_data.py, or its manifest.json): the
shards come from the manifest, which is checked before anything compiles: its dtype against
data.token_dtype, its shards' sizes, its tokenizer's hash against data.tokenizer's, and its vocabulary
against model.vocab_size (the manifest records the largest id, so no token is scanned).

The run's tokenizer (`run_tokenizer`) is recorded in <workdir>/tokenizer/ (`record_tokenizer`): its files
and a record of its hash, which generation reads back (`workdir_tokenizer`) to decode with.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os

import grain
import numpy as np

from jaxpar.config import ConfigError, DataConfig
from jaxpar.data import corpus as corpus_lib, tokenizer as tokenizer_lib
from jaxpar.data.tokenizer import ByteTokenizer, Tokenizer

BYTE_VOCAB = 256
_log = logging.getLogger(__name__)
TOKEN_DOC_LEN = 1 << 16
# A prepared corpus smaller than this many TOKEN_DOC_LEN blocks is cut into this many (of at least
# MIN_BLOCK tokens), so that a small corpus still has documents for the train/eval split.
MIN_BLOCKS, MIN_BLOCK = 64, 1024
# Rows are packed in groups of this many bins; more bins give remainder chunks more places to fit
# (less padding) at a cost linear in the bin count per packed chunk.
NUM_PACKING_BINS = 64
_GLOB_MAGIC = frozenset("*?[")
# Tokens per read when scanning ids against the vocabulary: 16-32 MB at a time, so memory stays flat.
SCAN_TOKENS = 1 << 23
# A uint16 file with a zero at every odd position is uint32 ids read as uint16 (their high halves); this
# many tokens make a false alarm on real text impossible in practice.
_MIN_TOKENS_FOR_DTYPE_GUESS = 1024
BYTE_SOURCES = ("stdlib", "text")
TOKENIZER_DIR = "tokenizer"  # in the workdir
TOKENIZER_RECORD = "jaxpar_tokenizer.json"  # in TOKENIZER_DIR: which tokenizer the run used (its sha256)


@dataclasses.dataclass(frozen=True)
class _Corpus:
    """Files and the documents in them, as token offsets; no token has been read."""

    paths: list[str]
    dtype: np.dtype
    doc_file: np.ndarray  # [n_docs] index into `paths`
    doc_start: np.ndarray  # [n_docs] offset of the first token in its file
    doc_len: np.ndarray  # [n_docs] tokens, each >= 2 so every document has a next-token pair
    doc_key: list[str]  # stable name that decides the train/eval split
    arrays: tuple[np.ndarray, ...] | None = None  # each file's ids, where tokenized in memory


@functools.lru_cache(maxsize=4)
def _tokenizer_at(spec: str, stamp: tuple) -> Tokenizer:
    del stamp  # part of the cache key only: a tokenizer.json rewritten in place is loaded again
    try:
        return tokenizer_lib.load_tokenizer(spec)
    except tokenizer_lib.TokenizerError as error:
        raise ConfigError(f"data.tokenizer={spec!r}: {error}") from None


def _load_tokenizer(spec: str) -> Tokenizer:
    try:
        stat = os.stat(tokenizer_lib.tokenizer_file(spec)) if spec not in ("", tokenizer_lib.BYTES) else None
    except tokenizer_lib.TokenizerError as error:
        raise ConfigError(f"data.tokenizer={spec!r}: {error}") from None
    return _tokenizer_at(spec, stat and (stat.st_size, stat.st_mtime_ns))


def _manifest(cfg: DataConfig) -> dict | None:
    """The checked manifest of a prepared corpus (data.path a prepared directory or its manifest.json);
    None for a glob of plain token files and for the byte sources."""
    path = corpus_lib.manifest_path(cfg.path) if cfg.source == "tokens" else None
    if path is None:
        return None
    try:
        manifest = corpus_lib.read_manifest(path)
    except corpus_lib.CorpusError as error:
        raise ConfigError(f"data.path={cfg.path!r}: {error}") from None
    if manifest["dtype"] != cfg.token_dtype:
        raise ConfigError(
            f"data.token_dtype={cfg.token_dtype!r}, but the prepared corpus {path!r} holds "
            f"{manifest['dtype']} tokens (vocabulary {manifest['vocab_size']}); set "
            f"--config.data.token_dtype={manifest['dtype']}."
        )
    recorded = manifest["tokenizer"]
    mine = _load_tokenizer(cfg.tokenizer).sha256 if cfg.tokenizer else None
    if mine is not None and mine != recorded.get("sha256"):
        raise ConfigError(
            f"data.tokenizer={cfg.tokenizer!r} (sha256 {mine[:16]}...) is not "
            f"the tokenizer that wrote the prepared corpus {path!r}: {recorded.get('spec')!r} (sha256 "
            f"{str(recorded.get('sha256'))[:16]}...); its ids would mean other text. Set "
            f"--config.data.tokenizer={recorded.get('spec')!r} (or leave it empty to use the manifest's), or "
            "prepare the corpus again with this tokenizer."
        )
    manifest["manifest_path"] = path
    return manifest


def run_tokenizer(cfg: DataConfig) -> Tokenizer | None:
    """The tokenizer of the run's ids: data.tokenizer when set; else bytes for stdlib/text, the tokenizer a
    prepared corpus's manifest names (if it still loads, with the recorded hash), None (ids only) for
    plain token files."""
    if cfg.tokenizer:
        return _load_tokenizer(cfg.tokenizer)
    if cfg.source in BYTE_SOURCES:
        return ByteTokenizer()
    manifest = _manifest(cfg)
    return None if manifest is None else corpus_lib.manifest_tokenizer(manifest)


_TOKENIZED: dict = {}  # the newest in-memory tokenization only: (tokenizer hash, file stats) -> arrays


def _tokenized(tokenizer: Tokenizer, paths: list[str]) -> tuple[np.ndarray, ...]:
    """Each file's text (UTF-8, undecodable bytes replaced) tokenized, EOS appended; cached, since the
    train and eval iterators and the checks each build the corpus."""
    key = (tokenizer.sha256, tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths))
    if key not in _TOKENIZED:
        texts = []
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        dtype = corpus_lib.token_dtype(tokenizer.vocab_size)
        eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        arrays = tuple(np.array(ids + eos, dtype=dtype) for ids in tokenizer.encode_batch(texts))
        _TOKENIZED.clear()
        _TOKENIZED[key] = arrays
    return _TOKENIZED[key]


def _glob_root(pattern: str) -> str:
    """The directory part of `pattern` before any wildcard: the split names files relative to it, so a
    corpus keeps its split when it moves or is mounted elsewhere on another host."""
    root = os.path.dirname(pattern)
    while _GLOB_MAGIC & set(root):
        root = os.path.dirname(root)
    return root or os.curdir


def _corpus(cfg: DataConfig) -> _Corpus:
    manifest = _manifest(cfg)
    if cfg.source == "stdlib":
        root, paths = corpus_lib.stdlib_files()
        where = f"the standard library under {root!r}"
    elif manifest is not None:
        root, paths = os.path.dirname(manifest["manifest_path"]), manifest["paths"]
        where = f"data.path={cfg.path!r} (the prepared corpus {manifest['manifest_path']!r})"
    else:
        root = _glob_root(cfg.path)
        paths = sorted(p for p in glob.glob(cfg.path, recursive=True) if os.path.isfile(p))
        where = f"data.path={cfg.path!r}"
    if not paths and cfg.source == "tokens" and os.path.isdir(cfg.path):
        raise ConfigError(
            f"data.path={cfg.path!r} is a directory without the {corpus_lib.MANIFEST} that "
            "scripts/prepare_data.py writes; point data.path at a prepared directory, or at a glob of flat "
            f"token files such as {os.path.join(cfg.path, '*.bin')!r}."
        )
    if not paths:
        raise ConfigError(
            f"{where} matches no files (data.source={cfg.source!r}); set data.path to a glob of existing "
            "files, e.g. --config.data.path='/data/**/*.txt' (** reaches into subdirectories)."
        )
    dtype = np.dtype(cfg.token_dtype if cfg.source == "tokens" else np.uint8)
    token_block = TOKEN_DOC_LEN
    if manifest is not None:
        token_block = min(TOKEN_DOC_LEN, max(MIN_BLOCK, -(-manifest["tokens"] // MIN_BLOCKS)))
    tokenizer = run_tokenizer(cfg) if cfg.source in BYTE_SOURCES else None
    arrays = None
    if tokenizer is not None and not isinstance(tokenizer, ByteTokenizer):
        for path in paths:
            _readable(path, where)
        arrays = _tokenized(tokenizer, paths)
        dtype = arrays[0].dtype
    doc_file, doc_start, doc_len, doc_key = [], [], [], []
    for file_id, path in enumerate(paths):
        size = _readable(path, where) if arrays is None else arrays[file_id].nbytes
        if size % dtype.itemsize:
            raise ConfigError(
                f"token file {path!r} has {size} bytes, not a multiple of {dtype.itemsize} "
                f"(data.token_dtype={cfg.token_dtype!r}); set data.token_dtype to the dtype it was written "
                "with, or replace the file if it is truncated."
            )
        n_tokens = size // dtype.itemsize
        block = token_block if cfg.source == "tokens" else max(n_tokens, 1)  # max: range() needs a step
        name = os.path.relpath(path, root)
        for start in range(0, n_tokens, block):
            length = min(block, n_tokens - start)
            if length >= 2:
                doc_file.append(file_id)
                doc_start.append(start)
                doc_len.append(length)
                doc_key.append(f"{name}@{start // block}" if cfg.source == "tokens" else name)
    if len(doc_len) < 2:
        raise ConfigError(
            f"{where} holds {len(doc_len)} document(s) of at least 2 tokens; the train/eval split needs at "
            "least 2. Add files, or point data.path at a larger corpus."
        )
    return _Corpus(paths, dtype, np.array(doc_file), np.array(doc_start), np.array(doc_len), doc_key, arrays)


def _readable(path: str, where: str) -> int:
    """The file's size in bytes; ConfigError if it cannot be opened."""
    try:
        with open(path, "rb"):
            return os.path.getsize(path)
    except OSError as err:
        raise ConfigError(
            f"data file {path!r} cannot be read ({err}); fix its permissions or narrow {where}."
        ) from err


def check_data(cfg: DataConfig) -> None:
    """Fail with a ConfigError before anything compiles if the data cannot be read; costs a `stat` and an
    `open` per file, no token reads."""
    _corpus(cfg)


def _scan_max(path: str, dtype: np.dtype, chunk_tokens: int) -> tuple[int, int, int]:
    """(tokens, largest id, largest id at an odd position) of a flat token file, read chunk by chunk."""
    n_tokens = os.path.getsize(path) // dtype.itemsize
    chunk_tokens += chunk_tokens % 2  # even, so a chunk's odd positions are the file's
    top = odd_top = 0
    for start in range(0, n_tokens, chunk_tokens):
        tokens = np.memmap(
            path,
            dtype=dtype,
            mode="r",
            offset=start * dtype.itemsize,
            shape=(min(chunk_tokens, n_tokens - start),),
        )
        top = max(top, int(tokens.max()))
        if len(tokens) > 1:
            odd_top = max(odd_top, int(tokens[1::2].max()))
        del tokens  # unmaps the chunk
    return n_tokens, top, odd_top


def check_token_ids(cfg: DataConfig, vocab_size: int, chunk_tokens: int = SCAN_TOKENS) -> None:
    """ConfigError before anything compiles if a `tokens` file holds an id >= `vocab_size` (the embedding
    lookup would read NaN and the run would stop at step 1) or looks written with another dtype than
    data.token_dtype. Reads every token once, `chunk_tokens` at a time (numpy max over a memmap: about a
    second per GB from the page cache). Byte sources need no scan: their ids are < 256 <= vocab_size;
    nor do tokenized text (< the tokenizer's vocabulary) and prepared corpora (the manifest records the
    largest id). ConfigError too if the run's tokenizer has more tokens than `vocab_size`."""
    manifest = _manifest(cfg)
    if manifest is not None:
        path, largest = manifest["manifest_path"], max(manifest["vocab_size"] - 1, manifest["max_token_id"])
        if largest >= vocab_size:
            raise ConfigError(
                f"the prepared corpus {path!r} holds token ids up to {manifest['max_token_id']} from a "
                f"tokenizer of {manifest['vocab_size']} tokens, but model.vocab_size={vocab_size}: "
                f"ids must be < vocab_size. Set --config.model.vocab_size to at least {largest + 1} (a "
                "multiple of 128 suits the hardware), or prepare the corpus with a smaller tokenizer."
            )
    tokenizer = run_tokenizer(cfg)
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"the run's tokenizer {tokenizer.name!r} (data.tokenizer={cfg.tokenizer!r}) has "
            f"{tokenizer.vocab_size} tokens, but model.vocab_size={vocab_size}; set "
            f"--config.model.vocab_size to at least {tokenizer.vocab_size} (a multiple of 128 suits the "
            "hardware)."
        )
    if cfg.source != "tokens" or manifest is not None:
        return
    corpus = _corpus(cfg)  # also: sizes that are not a multiple of the dtype's
    dtype = corpus.dtype
    read_as = f"read as data.token_dtype={cfg.token_dtype!r}"
    for path in corpus.paths:
        n_tokens, top, odd_top = _scan_max(path, dtype, chunk_tokens)
        if top >= vocab_size:
            if dtype == np.uint32 and _scan_max(path, np.dtype(np.uint16), chunk_tokens)[1] < vocab_size:
                fix = (
                    "as uint16 every id would be in range: the file looks written as uint16 (pairs of ids "
                    "read as one), so set --config.data.token_dtype=uint16."
                )
            else:
                fix = (
                    f"set --config.model.vocab_size to at least {top + 1} if that is the tokenizer's "
                    "vocabulary, or set data.token_dtype to the dtype the file was written with."
                )
            raise ConfigError(
                f"token file {path!r} ({read_as}) holds token id {top}, but model.vocab_size={vocab_size}: "
                f"ids must be < vocab_size, or the run reads NaN embeddings and stops at step 1. Fix: {fix}"
            )
        high_halves = (vocab_size - 1) >> 16  # the largest high half of a uint32 id below vocab_size
        if dtype == np.uint16 and n_tokens >= _MIN_TOKENS_FOR_DTYPE_GUESS and odd_top <= high_halves < top:
            raise ConfigError(
                f"token file {path!r} ({read_as}) holds only ids <= {odd_top} at every odd position of its "
                f"{n_tokens} tokens: it looks written as uint32 (the high half of each id reads as a token "
                "of its own). Set --config.data.token_dtype=uint32."
            )


def vocab_size(cfg: DataConfig) -> int | None:
    """The run's tokenizer's vocabulary (256 for bytes); None for plain token files without a tokenizer,
    whose vocabulary only the model config knows."""
    tokenizer = run_tokenizer(cfg)
    if tokenizer is not None:
        return tokenizer.vocab_size
    manifest = _manifest(cfg)
    return None if manifest is None else manifest["vocab_size"]


def record_tokenizer(cfg: DataConfig, workdir: str, write: bool = True) -> None:
    """<workdir>/tokenizer/: the run's tokenizer files and TOKENIZER_RECORD (its spec and sha256), for
    generation and export. ConfigError if the workdir was trained with another tokenizer (a resumed run
    whose ids would mean other text). `write`: False on all but one process of a multi-process job."""
    tokenizer = run_tokenizer(cfg)
    if tokenizer is None:
        manifest = _manifest(cfg)
        if manifest is not None and write:
            _log.warning(
                "the tokenizer %r that wrote %s is gone or changed; this run records none, so generation "
                "takes token ids only. Set data.tokenizer to a copy of it to record it.",
                manifest["tokenizer"].get("spec"),
                manifest["manifest_path"],
            )
        return
    previous = _read_record(workdir)
    if previous is not None and previous["sha256"] != tokenizer.sha256:
        raise ConfigError(
            f"workdir {workdir!r} was trained with tokenizer {previous.get('spec')!r} (sha256 "
            f"{previous['sha256'][:16]}...), this run's is {tokenizer.name!r} (sha256 "
            f"{tokenizer.sha256[:16]}...): "
            "its checkpoints' ids mean other text. Set data.tokenizer back, or give this run a new --workdir."
        )
    if not write:
        return
    out = os.path.join(workdir, TOKENIZER_DIR)
    tokenizer_lib.save_tokenizer_files(tokenizer, out)
    os.makedirs(out, exist_ok=True)
    record = {
        "spec": corpus_lib.tokenizer_spec(tokenizer),
        "sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
    }
    with open(os.path.join(out, TOKENIZER_RECORD + ".tmp"), "w") as f:
        json.dump(record, f, indent=1)
    os.replace(os.path.join(out, TOKENIZER_RECORD + ".tmp"), os.path.join(out, TOKENIZER_RECORD))


def _read_record(workdir: str) -> dict | None:
    path = os.path.join(workdir, TOKENIZER_DIR, TOKENIZER_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record.get("sha256"), str) or "spec" not in record:
            raise ValueError("no sha256 / spec")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{path!r} is unreadable ({error!r}); delete it and rerun training to rewrite it."
        ) from None
    return record


def workdir_tokenizer(workdir: str) -> Tokenizer | None:
    """The tokenizer a training run recorded in its workdir (`record_tokenizer`), checked against its
    recorded hash; None where the run recorded none (ids only, or a run from before the record)."""
    record = _read_record(workdir)
    if record is None:
        return None
    if record["spec"] == tokenizer_lib.BYTES:
        return ByteTokenizer()
    path = os.path.join(workdir, TOKENIZER_DIR)
    try:
        tokenizer = tokenizer_lib.HFTokenizer(path)
    except tokenizer_lib.TokenizerError as error:
        raise ConfigError(f"the run's tokenizer copy is unusable: {error}") from None
    if tokenizer.sha256 != record["sha256"]:
        raise ConfigError(
            f"{path}/{tokenizer_lib.TOKENIZER_FILE} (sha256 {tokenizer.sha256[:16]}...) is not the "
            f"tokenizer the run trained with (sha256 {record['sha256'][:16]}..., from {record['spec']!r}); "
            f"copy that tokenizer's files into {path}."
        )
    return tokenizer


def _split_docs(corpus: _Corpus, eval_fraction: float, split: str) -> np.ndarray:
    """Indices (ascending) of the documents in `split`."""
    n_docs = len(corpus.doc_key)
    rank_keys = [hashlib.blake2b(key.encode(), digest_size=8).digest() for key in corpus.doc_key]
    by_hash = sorted(range(n_docs), key=rank_keys.__getitem__)
    n_eval = min(n_docs - 1, max(1, round(eval_fraction * n_docs)))
    chosen = by_hash[:n_eval] if split == "eval" else by_hash[n_eval:]
    return np.sort(np.array(chosen))


def _chunk_table(
    corpus: _Corpus, docs: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(file, first token, token count) per chunk, in document order; consecutive chunks of a document
    overlap by one token because a chunk's last token is only a target."""
    pairs = corpus.doc_len[docs] - 1
    n_chunks = -(-pairs // seq_len)
    doc_of_chunk = np.repeat(docs, n_chunks)
    chunk_in_doc = np.arange(n_chunks.sum()) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    done_pairs = chunk_in_doc * seq_len
    lengths = np.minimum(seq_len, corpus.doc_len[doc_of_chunk] - 1 - done_pairs) + 1
    return corpus.doc_file[doc_of_chunk], corpus.doc_start[doc_of_chunk] + done_pairs, lengths


def _read_chunk(
    index: int,
    *,
    paths: list[str],
    dtype: np.dtype,
    files: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    arrays: tuple[np.ndarray, ...] | None = None,
) -> dict[str, np.ndarray]:
    start, length = int(starts[index]), int(lengths[index])
    if arrays is not None:
        tokens = arrays[files[index]][start : start + length]
    else:
        # A fresh memmap per read holds no file descriptor between reads: a corpus can have thousands of
        # files.
        tokens = np.memmap(
            paths[files[index]], dtype=dtype, mode="r", offset=start * dtype.itemsize, shape=(length,)
        )
    tokens = tokens.astype(np.int32)
    return {"inputs": tokens[:-1], "targets": tokens[1:]}


def _local_rows(batch: dict[str, np.ndarray], *, batch_size: int, lo: int, hi: int) -> dict[str, np.ndarray]:
    """This process's rows [lo, hi) of a global batch, under the training loop's names. Only the last
    batch of a finite pass is short; it is padded with all-padding rows (segment id 0, masked by the loss)
    so that every batch has the same shape and nothing recompiles."""
    names = {
        "inputs": "inputs",
        "targets": "targets",
        "segment_ids": "inputs_segment_ids",
        "positions": "inputs_positions",
    }
    out = {}
    for name, packed_name in names.items():
        rows = batch[packed_name]
        if len(rows) < batch_size:
            rows = np.pad(rows, ((0, batch_size - len(rows)), (0, 0)))
        out[name] = rows[lo:hi]
    return out


def make_batches(
    cfg: DataConfig,
    *,
    split: str,
    seq_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
) -> grain.DatasetIterator:
    """Iterator over dicts of int32 [batch_size // process_count, seq_len] arrays: inputs, targets,
    segment_ids (1, 2, ... per chunk in a row, 0 for padding) and positions (0.. within each chunk).

    Every process builds the same global batch and keeps rows [i * b, (i + 1) * b): packing is a
    sequential pass over all chunks, so it cannot be split by process without changing the batches.
    `train` is shuffled by `seed` (reshuffled each epoch) when `cfg.shuffle`; `eval` keeps file order.
    With repeat=False the iterator ends after one pass.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; choose 'train' or 'eval'.")
    if seq_len < 1 or batch_size < 1 or batch_size % process_count or not 0 <= process_index < process_count:
        raise ConfigError(
            f"batch_size={batch_size} must be a positive multiple of process_count={process_count} and "
            f"seq_len={seq_len} positive, with 0 <= process_index={process_index} < process_count; pick a "
            f"global batch divisible by {process_count}."
        )
    corpus = _corpus(cfg)
    files, starts, lengths = _chunk_table(corpus, _split_docs(corpus, cfg.eval_fraction, split), seq_len)
    chunks = grain.MapDataset.range(len(lengths))
    if split == "train" and cfg.shuffle:
        # Shuffling chunks rather than documents keeps the chunks of one long file out of the same batch;
        # shuffle-then-repeat draws a new permutation each epoch.
        chunks = chunks.shuffle(seed=cfg.seed)
    if repeat:
        chunks = chunks.repeat()
    chunks = chunks.map(
        functools.partial(
            _read_chunk,
            paths=corpus.paths,
            dtype=corpus.dtype,
            files=files,
            starts=starts,
            lengths=lengths,
            arrays=corpus.arrays,
        )
    )
    # Reads are small local memmaps: grain's default 16 reader threads and 500-chunk buffer made batches
    # ~5x slower (GIL contention, buffer bookkeeping) than reading in the calling thread.
    rows = grain.experimental.FirstFitPackIterDataset(
        chunks.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
        length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=NUM_PACKING_BINS,
        shuffle_bins=False,  # chunks arrive shuffled already
    )
    local = batch_size // process_count
    batches = rows.batch(batch_size).map(
        functools.partial(
            _local_rows, batch_size=batch_size, lo=process_index * local, hi=(process_index + 1) * local
        )
    )
    return iter(batches)
