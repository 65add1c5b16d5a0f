"""Deterministic, checkpointable batches of packed token rows, built on grain.

The pipeline is: files -> documents -> train/eval split -> chunks of at most `seq_len` input/target
pairs -> (shuffle, repeat) -> read -> first-fit packing into rows -> global batch -> this process's rows.

Everything up to "read" is a table computed from file sizes alone, so building an iterator costs a
directory walk and a few `stat` calls, and tokens are read lazily (memory mapped) only for the chunks a
batch needs. Because every stage before packing is an index lookup in a grain `MapDataset`, the
iterator's state is a handful of integers: JSON-serialisable, and restoring it replays exactly the same
batches.

Documents: for `stdlib` and `text` each file is one document of byte tokens. A `tokens` file is a flat
stream with no document boundaries we could know about, so it is cut into documents of
`TOKEN_DOC_LEN` tokens; this gives the train/eval split something finer than whole files to work with
(a corpus is often a single file). A document of L tokens has L - 1 next-token pairs; it is cut into
chunks of `seq_len` pairs (seq_len + 1 tokens, consecutive chunks share one token, so no pair is lost)
plus a shorter remainder, and each chunk becomes its own segment in a packed row.

Split: documents are ranked by a hash of a stable name (path relative to the corpus root, plus block
index for `tokens`); the lowest `eval_fraction` of them, at least one and never all, form `eval`. The
split ignores `seed`, so evaluation losses stay comparable across runs.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import sysconfig

import grain
import numpy as np

from jaxpar.config import ConfigError, DataConfig

BYTE_VOCAB = 256
TOKEN_DOC_LEN = 1 << 16
# Rows are packed in groups of this many bins; more bins give remainder chunks more places to fit
# (less padding) at a cost linear in the bin count per packed chunk.
NUM_PACKING_BINS = 64
# Test suites dominate the stdlib by size (and hold odd data such as encoding tables); without them and
# without installed packages the corpus is ~12 MB of ordinary library code.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_GLOB_MAGIC = frozenset("*?[")
# Tokens per read when scanning ids against the vocabulary: 16-32 MB at a time, so memory stays flat.
SCAN_TOKENS = 1 << 23
# A uint16 file with a zero at every odd position is uint32 ids read as uint16 (their high halves); this
# many tokens make a false alarm on real text impossible in practice.
_MIN_TOKENS_FOR_DTYPE_GUESS = 1024


@dataclasses.dataclass(frozen=True)
class _Corpus:
    """Files and the documents in them, as token offsets; no token has been read."""

    paths: list[str]
    dtype: np.dtype
    doc_file: np.ndarray  # [n_docs] index into `paths`
    doc_start: np.ndarray  # [n_docs] offset of the first token in its file
    doc_len: np.ndarray  # [n_docs] tokens, each >= 2 so every document has a next-token pair
    doc_key: list[str]  # stable name that decides the train/eval split


def _stdlib_files() -> tuple[str, list[str]]:
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP_DIRS]
        paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    return root, sorted(paths)


def _glob_root(pattern: str) -> str:
    """The directory part of `pattern` before any wildcard: the split names files relative to it, so a
    corpus keeps its split when it moves or is mounted elsewhere on another host."""
    root = os.path.dirname(pattern)
    while _GLOB_MAGIC & set(root):
        root = os.path.dirname(root)
    return root or os.curdir


def _corpus(cfg: DataConfig) -> _Corpus:
    if cfg.source == "stdlib":
        root, paths = _stdlib_files()
        where = f"the standard library under {root!r}"
    else:
        root = _glob_root(cfg.path)
        paths = sorted(p for p in glob.glob(cfg.path, recursive=True) if os.path.isfile(p))
        where = f"data.path={cfg.path!r}"
    if not paths:
        raise ConfigError(
            f"{where} matches no files (data.source={cfg.source!r}); set data.path to a glob of existing "
            "files, e.g. --config.data.path='/data/**/*.txt' (** reaches into subdirectories)."
        )
    dtype = np.dtype(cfg.token_dtype if cfg.source == "tokens" else np.uint8)
    doc_file, doc_start, doc_len, doc_key = [], [], [], []
    for file_id, path in enumerate(paths):
        try:
            with open(path, "rb"):
                size = os.path.getsize(path)
        except OSError as err:
            raise ConfigError(
                f"data file {path!r} cannot be read ({err}); fix its permissions or narrow {where}."
            ) from err
        if size % dtype.itemsize:
            raise ConfigError(
                f"token file {path!r} has {size} bytes, not a multiple of {dtype.itemsize} "
                f"(data.token_dtype={cfg.token_dtype!r}); set data.token_dtype to the dtype it was written "
                "with, or replace the file if it is truncated."
            )
        n_tokens = size // dtype.itemsize
        block = TOKEN_DOC_LEN if cfg.source == "tokens" else max(n_tokens, 1)  # max: range() needs a step
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
    return _Corpus(paths, dtype, np.array(doc_file), np.array(doc_start), np.array(doc_len), doc_key)


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
    second per GB from the page cache). Byte sources need no scan: their ids are < 256 <= vocab_size."""
    if cfg.source != "tokens":
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
    """256 for byte sources; None for `tokens`, whose vocabulary only the model config knows."""
    return None if cfg.source == "tokens" else BYTE_VOCAB


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
) -> dict[str, np.ndarray]:
    # A fresh memmap per read holds no file descriptor between reads: a corpus can have thousands of files.
    tokens = np.memmap(
        paths[files[index]],
        dtype=dtype,
        mode="r",
        offset=int(starts[index]) * dtype.itemsize,
        shape=(int(lengths[index]),),
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
            _read_chunk, paths=corpus.paths, dtype=corpus.dtype, files=files, starts=starts, lengths=lengths
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
