"""Prepared corpora: documents read from .txt, .jsonl, .jsonl.gz and .parquet files, tokenized in worker
processes, written as flat token shards plus `manifest.json` (scripts/prepare_data.py), and the manifest
read back and checked (jaxpar.train.data, data.source=tokens).

A .txt (.md, .py) file is one document; a .jsonl(.gz) line or a .parquet row is one document, its text under
`text_key`. Each document's ids are followed by the tokenizer's EOS id. Shards are raw little-endian
uint16 (vocabularies up to 65536) or uint32, named shard_00000.bin, ...; a document never spans two shards.

Reading: .jsonl(.gz) with the standard library's json and gzip, line by line; .parquet with pyarrow's
ParquetFile.iter_batches over the text column only. Both stream in constant memory and need no cache.
(`datasets.load_dataset("json"/"parquet")` reads through the same pyarrow, but first converts every file
into an Arrow copy under its cache directory, doubling the disk a corpus takes, and its streaming mode adds
nothing here; the tests use it as the independent reference reader.)

Order is deterministic: documents in sorted file order, file order inside each file, whatever the number
of workers (batches are tokenized in parallel and written in order).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import multiprocessing
import os
import sysconfig
import time
from collections.abc import Callable, Iterator

import numpy as np

from jaxpar.data.tokenizer import BYTES, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
FORMAT = "jaxpar.tokens.v1"
TEXT_SUFFIXES = (".txt", ".md", ".py")  # one file, one document
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".jsonl.gz", ".parquet")
# Characters of text per task sent to a worker: large enough that pickling and scheduling are a small
# share of the tokenizing, small enough that the progress bar moves and workers stay evenly busy.
BATCH_CHARS = 1 << 20
DEFAULT_SHARD_TOKENS = 1 << 28
_GLOB_MAGIC = frozenset("*?[")
# Test suites dominate the stdlib by size (and hold odd data such as encoding tables); without them and
# without installed packages the corpus is ~12 MB of ordinary library code.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


class CorpusError(ValueError):
    """An input file, output directory or manifest that cannot be used; the message names it and the fix."""


def stdlib_files() -> tuple[str, list[str]]:
    """(root, sorted .py files) of the Python standard library: jaxpar's download-free corpus."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP_DIRS]
        paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    return root, sorted(paths)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_spec(tokenizer: Tokenizer) -> str:
    """What load_tokenizer takes to load `tokenizer` again: 'bytes' or the absolute path of tokenizer.json."""
    return BYTES if isinstance(tokenizer, ByteTokenizer) else os.path.abspath(tokenizer.path)


def input_files(pattern: str) -> list[str]:
    """The files `pattern` (a glob; ** reaches into subdirectories; a directory means everything in it)
    matches, sorted; CorpusError if there are none or one has a suffix we cannot read."""
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise CorpusError(
            f"--input={pattern!r} matches no files; give a glob of {', '.join(SUFFIXES)} files."
        )
    unreadable = [p for p in paths if not p.endswith(SUFFIXES)]
    if unreadable:
        raise CorpusError(
            f"--input={pattern!r} matches {len(unreadable)} file(s) of a kind prepare_data cannot read, e.g. "
            f"{unreadable[0]!r}; readable are {', '.join(SUFFIXES)}. Narrow the glob (e.g. '*.jsonl')."
        )
    return paths


def read_documents(path: str, text_key: str = "text") -> Iterator[str]:
    """The documents of one input file, in file order."""
    if path.endswith(TEXT_SUFFIXES):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()
    elif path.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise CorpusError(
                        f"{path}:{number} is not JSON ({line[:60]!r}); each line of a .jsonl file is one "
                        "object."
                    ) from None
                yield _text_of(record, text_key, f"{path}:{number}")
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if text_key not in names:
            raise CorpusError(
                f"{path!r} has no column {text_key!r} (its columns: {names}); pass --text_key=NAME."
            )
        for batch in parquet.iter_batches(columns=[text_key], batch_size=4096):
            for number, text in enumerate(batch.column(0).to_pylist()):
                if not isinstance(text, str):
                    raise CorpusError(
                        f"{path!r} column {text_key!r} holds {type(text).__name__} (row {number} of a "
                        "batch), not text; pass --text_key with a string column."
                    )
                yield text
    else:
        raise CorpusError(f"{path!r}: cannot read this kind of file; readable are {', '.join(SUFFIXES)}.")


def _text_of(record, text_key: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise CorpusError(
            f"{where}: the record has no string under {text_key!r} (it has {keys}); pass --text_key=NAME."
        )
    return record[text_key]


def _batches(paths: list[str], text_key: str, batch_chars: int) -> Iterator[tuple[int, list[str]]]:
    """(file index, documents) of about `batch_chars` characters; a batch never spans two files."""
    for index, path in enumerate(paths):
        batch, chars = [], 0
        for text in read_documents(path, text_key):
            batch.append(text)
            chars += len(text)
            if chars >= batch_chars:
                yield index, batch
                batch, chars = [], 0
        if batch:
            yield index, batch


def encode_documents(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, int]:
    """The documents' ids, each followed by EOS, as one flat array; and the largest id."""
    docs = tokenizer.encode_batch(texts)
    flat = np.empty(sum(map(len, docs)) + len(docs), dtype=np.int64)
    at = 0
    for ids in docs:
        flat[at : at + len(ids)] = ids
        flat[at + len(ids)] = tokenizer.eos_id
        at += len(ids) + 1
    return flat.astype(dtype), int(flat.max()) if len(flat) else 0


_WORKER: dict = {}


def _start_worker(spec: str, dtype: str) -> None:
    # One thread per worker process: the pool is the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tokenizer=load_tokenizer(spec), dtype=np.dtype(dtype))


def _encode_task(task: tuple[int, list[str]]) -> tuple[int, int, np.ndarray, int]:
    index, texts = task
    flat, top = encode_documents(_WORKER["tokenizer"], texts, _WORKER["dtype"])
    return index, len(texts), flat, top


def _in_order(pool, tasks: Iterator, in_flight: int) -> Iterator:
    """Results of `_encode_task` over `tasks`, in order, with at most `in_flight` batches read ahead (a
    Pool's imap would read the whole corpus into its queue first)."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(_encode_task, (task,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@dataclasses.dataclass
class _ShardWriter:
    out: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict] = dataclasses.field(default_factory=list)
    file: object = None

    def write(self, flat: np.ndarray, n_docs: int) -> None:
        if self.file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()
            name = f"shard_{len(self.shards):05d}.bin"
            self.file = open(os.path.join(self.out, name), "wb")
            self.shards.append({"file": name, "tokens": 0, "documents": 0})
        flat.astype(self.dtype.newbyteorder("<"), copy=False).tofile(self.file)
        self.shards[-1]["tokens"] += len(flat)
        self.shards[-1]["documents"] += n_docs

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def prepare(
    pattern: str,
    tokenizer_spec_or_path: str,
    out: str,
    *,
    text_key: str = "text",
    workers: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_chars: int = BATCH_CHARS,
    progress: Callable[[int], None] | bool = False,
) -> dict:
    """Tokenizes the files `pattern` matches into `out` (new or empty): shards, then manifest.json last (a
    directory with a manifest is complete). workers=0 tokenizes in this process; N > 0 in N spawned worker
    processes. `progress`: True for a tqdm bar, or a callable given the tokens of each batch. Returns the
    manifest."""
    paths = input_files(pattern)
    tokenizer = load_tokenizer(tokenizer_spec_or_path)
    if tokenizer.eos_id is None:
        raise CorpusError(
            f"tokenizer {tokenizer.name!r} has no EOS token to end each document with; name one as "
            "eos_token in the tokenizer_config.json beside its tokenizer.json."
        )
    if os.path.isdir(out) and os.listdir(out):
        raise CorpusError(f"--out={out!r} is not empty; give a new directory (nothing in it was changed).")
    os.makedirs(out, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    sources = [{"path": os.path.abspath(p), "documents": 0, "tokens": 0} for p in paths]
    writer = _ShardWriter(out, dtype, shard_tokens)
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(unit="tok", unit_scale=True, desc=f"tokenizing {len(paths)} file(s)", mininterval=0.5)
    top = 0
    start = time.perf_counter()
    tasks = _batches(paths, text_key, batch_chars)
    if workers:
        context = multiprocessing.get_context("spawn")  # fork would copy a parent's jax/tokenizers threads
        pool = context.Pool(workers, _start_worker, (tokenizer_spec(tokenizer), dtype.name))
        results = _in_order(pool, tasks, in_flight=2 * workers)
    else:
        pool = None
        results = ((index, len(texts), *encode_documents(tokenizer, texts, dtype)) for index, texts in tasks)
    try:
        for index, n_docs, flat, batch_top in results:
            writer.write(flat, n_docs)
            sources[index]["documents"] += n_docs
            sources[index]["tokens"] += len(flat)
            top = max(top, batch_top)
            if bar is not None:
                bar.update(len(flat))
            elif callable(progress):
                progress(len(flat))
    finally:
        writer.close()
        if pool is not None:
            pool.terminate()  # every result is in; also stops the workers when reading failed
            pool.join()
        if bar is not None:
            bar.close()
    manifest = {
        "format": FORMAT,
        "tokens": sum(s["tokens"] for s in sources),
        "documents": sum(s["documents"] for s in sources),
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "max_token_id": top,
        "eos_id": tokenizer.eos_id,
        "tokenizer": {"spec": tokenizer_spec(tokenizer), "sha256": tokenizer.sha256},
        "text_key": text_key,
        "sources": sources,
        "shards": writer.shards,
        "seconds": round(time.perf_counter() - start, 3),
        "workers": workers,
    }
    with open(os.path.join(out, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(os.path.join(out, MANIFEST + ".tmp"), os.path.join(out, MANIFEST))
    return manifest


def manifest_path(path: str) -> str | None:
    """The manifest `path` names (a prepared directory or its manifest.json), or None for anything else
    (a glob of plain token files)."""
    if os.path.isdir(path):
        inside = os.path.join(path, MANIFEST)
        return inside if os.path.isfile(inside) else None
    return path if os.path.basename(path) == MANIFEST and not _GLOB_MAGIC & set(path) else None


_REQUIRED = {
    "tokens": int,
    "dtype": str,
    "vocab_size": int,
    "max_token_id": int,
    "tokenizer": dict,
    "shards": list,
}


def read_manifest(path: str) -> dict:
    """A prepared corpus's manifest, checked against its shards; the shards' paths made absolute (key
    "paths"). CorpusError naming the file, the bad value and the fix."""
    fix = "rerun scripts/prepare_data.py into a new --out directory"
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise CorpusError(f"manifest {path!r} cannot be read ({error}); {fix}.") from None
    missing = [k for k, kind in _REQUIRED.items() if not isinstance(manifest.get(k), kind)]
    if missing or manifest.get("dtype") not in ("uint16", "uint32"):
        raise CorpusError(
            f"manifest {path!r} lacks valid {missing or ['dtype']} (format {FORMAT} expected); {fix}."
        )
    dtype = np.dtype(manifest["dtype"])
    root = os.path.dirname(os.path.abspath(path))
    manifest["paths"] = []
    for shard in manifest["shards"]:
        shard_path = os.path.join(root, shard["file"])
        size = os.path.getsize(shard_path) if os.path.isfile(shard_path) else None
        if size != shard["tokens"] * dtype.itemsize:
            found = "is missing" if size is None else f"has {size} bytes"
            raise CorpusError(
                f"shard {shard_path!r} {found}, but manifest {path!r} records {shard['tokens']} tokens of "
                f"dtype {dtype.name} ({shard['tokens'] * dtype.itemsize} bytes): the shard is truncated or "
                f"was written with another dtype; {fix}."
            )
        manifest["paths"].append(shard_path)
    return manifest


def manifest_tokenizer(manifest: dict) -> Tokenizer | None:
    """The tokenizer a manifest names, if it can still be loaded and is the one that wrote the corpus."""
    spec = manifest["tokenizer"].get("spec", "")
    if spec == BYTES:
        return ByteTokenizer()
    try:
        tokenizer = HFTokenizer(spec)
    except ValueError:
        return None
    return tokenizer if tokenizer.sha256 == manifest["tokenizer"].get("sha256") else None
