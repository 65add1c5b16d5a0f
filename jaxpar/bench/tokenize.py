"""Tokenization throughput of scripts/prepare_data.py (the work behind experiments/bench_tokenize.py).

The corpus: the Python standard library's sources (jaxpar's download-free corpus), one JSON record per
module, spread over `files` .jsonl files. The tokenizer: a byte-level BPE trained on that corpus (or the
one given). Contenders, each from the .jsonl files to a token file on disk, repeated `reps` times,
alternating in this one process so that the load of the shared machine falls on all of them alike:

  loop         the baseline: a single-process Python loop, json.loads then tokenizer.encode per document
  workers=N    corpus.prepare with N spawned worker processes (start-up of the pool included)
  in-process   corpus.prepare with workers=0: one process, the Rust tokenizer's encode_batch (which
               threads across cores by itself)

Reported: tokens/s per contender (median over reps), the ratio to the loop's, CPU seconds (this process
plus its children) per rep, the load average around the run; and a check that every contender wrote the
same ids.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time

import numpy as np
import tokenizers

from jaxpar.data import corpus, tokenizer as tokenizer_lib

JSON_NAME, MD_NAME = "tokenize.json", "tokenize.md"


def _write_corpus(folder: str, files: int, max_mb: float) -> tuple[str, int, int]:
    """stdlib modules as .jsonl records over `files` files; (glob, documents, bytes)."""
    _, paths = corpus.stdlib_files()
    outs = [open(os.path.join(folder, f"part{i:02d}.jsonl"), "w", encoding="utf-8") for i in range(files)]
    documents = size = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        outs[documents % files].write(json.dumps({"text": text}) + "\n")
        documents, size = documents + 1, size + len(text.encode("utf-8"))
        if size >= max_mb * 2**20:
            break
    for out in outs:
        out.close()
    return os.path.join(folder, "*.jsonl"), documents, size


def _loop(pattern: str, tokenizer, out: str) -> int:
    """The baseline: one process, one document at a time."""
    dtype = corpus.token_dtype(tokenizer.vocab_size)
    tokens = 0
    with open(out, "wb") as f:
        for path in sorted(glob.glob(pattern)):
            with open(path, encoding="utf-8") as lines:
                for line in lines:
                    ids = tokenizer.encode(json.loads(line)["text"])
                    ids.append(tokenizer.eos_id)
                    np.array(ids, dtype=dtype).tofile(f)
                    tokens += len(ids)
    return tokens


def _cpu_seconds() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def run(
    out: str,
    *,
    tokenizer_path: str,
    vocab_size: int,
    workers: list[int],
    files: int,
    max_mb: float,
    reps: int,
):
    from jaxpar import machine  # here, not at the top: spawned workers import this module, and jax is slow

    scratch = tempfile.mkdtemp(prefix="bench_tokenize_")
    try:
        pattern, documents, size = _write_corpus(scratch, files, max_mb)
        trained_here = not tokenizer_path
        start = time.perf_counter()
        if trained_here:
            tokenizer_path = os.path.join(scratch, "tokenizer")
            texts = (json.loads(line)["text"] for p in sorted(glob.glob(pattern)) for line in open(p))
            tokenizer_lib.train_byte_bpe(texts, vocab_size, tokenizer_path, show_progress=False)
        train_seconds = time.perf_counter() - start
        tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
        contenders = {"loop": None, **{f"workers={n}": n for n in workers}, "in-process": 0}
        times = {name: [] for name in contenders}
        cpu = {name: [] for name in contenders}
        streams = {}
        load_before = os.getloadavg()
        for rep in range(reps):
            for name, n in contenders.items():
                target = os.path.join(scratch, f"{name}-{rep}")
                cpu0, t0 = _cpu_seconds(), time.perf_counter()
                if n is None:
                    tokens = _loop(pattern, tokenizer, target + ".bin")
                    stream = target + ".bin"
                else:
                    manifest = corpus.prepare(pattern, tokenizer_path, target, workers=n)
                    tokens = manifest["tokens"]
                    stream = os.path.join(target, manifest["shards"][0]["file"])
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(_cpu_seconds() - cpu0)
                if rep == 0:
                    streams[name] = np.fromfile(stream, corpus.token_dtype(tokenizer.vocab_size))
                    assert len(streams[name]) == tokens
                shutil.rmtree(target, ignore_errors=True)
                if os.path.exists(target + ".bin"):
                    os.remove(target + ".bin")
        load_after = os.getloadavg()
        reference = streams["loop"]
        identical = all(np.array_equal(s, reference) for s in streams.values())
        loop_rate = len(reference) / statistics.median(times["loop"])
        results = {
            "machine": {
                "cpu": machine.cpu_model(),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "tokenizers": tokenizers.__version__,
                "numpy": np.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "load_average_1_5_15_before": [round(x, 2) for x in load_before],
                "load_average_1_5_15_after": [round(x, 2) for x in load_after],
            },
            "corpus": {
                "what": "Python standard library sources (the stdlib corpus), one .jsonl record per module",
                "files": files,
                "documents": documents,
                "bytes": size,
                "tokens": int(len(reference)),
            },
            "tokenizer": {
                "path": "trained here (byte-level BPE on the corpus)" if trained_here else tokenizer_path,
                "vocab_size": tokenizer.vocab_size,
                "train_seconds": round(train_seconds, 2) if trained_here else None,
                "sha256": tokenizer.sha256,
            },
            "reps": reps,
            "outputs_identical": identical,
            "baseline": "loop: single-process Python loop of tokenizer.encode per document, same process",
            "contenders": {
                name: {
                    "seconds": [round(t, 3) for t in times[name]],
                    "tokens_per_s": round(len(reference) / statistics.median(times[name])),
                    "mb_per_s": round(size / 2**20 / statistics.median(times[name]), 3),
                    "ratio_vs_loop": round(len(reference) / statistics.median(times[name]) / loop_rate, 3),
                    "cpu_seconds_per_rep": round(statistics.median(cpu[name]), 3),
                    "tokens_per_cpu_s": round(len(reference) / statistics.median(cpu[name])),
                }
                for name in contenders
            },
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, JSON_NAME), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    render(out)
    return results


def render(out: str) -> None:
    with open(os.path.join(out, JSON_NAME)) as f:
        r = json.load(f)
    m, c, t = r["machine"], r["corpus"], r["tokenizer"]
    lines = [
        "# Tokenization throughput: scripts/prepare_data.py vs a single-process loop",
        "",
        "Written by `python experiments/bench_tokenize.py --out=benchmarks/interop` "
        "(jaxpar/bench/tokenize.py).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, tokenizers {m['tokenizers']}, "
        f"numpy {m['numpy']}; {m['date']}. Load average (1/5/15 min) {m['load_average_1_5_15_before']} "
        f"before, {m['load_average_1_5_15_after']} after: the machine is shared, other jobs ran alongside.",
        "",
        f"Corpus: {c['what']}: {c['documents']} documents, {c['bytes'] / 2**20:.1f} MB in {c['files']} "
        f".jsonl files, {c['tokens']:,} tokens. Tokenizer: {t['path']}, vocab {t['vocab_size']}.",
        "",
        f"Each contender reads the .jsonl files and writes a token file; {r['reps']} repetitions, contenders "
        "alternating in one process, median shown. Ratio: tokens/s over the single-process loop's, "
        f"measured in the same run. All contenders wrote identical ids: {r['outputs_identical']}.",
        "",
        "| contender | tokens/s | MB/s | vs loop | CPU s per rep | tokens per CPU s | seconds per rep |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, v in r["contenders"].items():
        lines.append(
            f"| {name} | {v['tokens_per_s']:,} | {v['mb_per_s']:.2f} | {v['ratio_vs_loop']:.2f}x | "
            f"{v['cpu_seconds_per_rep']:.1f} | {v['tokens_per_cpu_s']:,} | "
            f"{', '.join(f'{s:.2f}' for s in v['seconds'])} |"
        )
    lines += [
        "",
        "`loop`: json.loads and tokenizer.encode per document in one Python process (the baseline). "
        "`workers=N`: corpus.prepare with N spawned worker processes, each tokenizing ~1 MB batches with one "
        "thread; pool start-up is included (a user waits for it). `in-process`: corpus.prepare with "
        "workers=0, the Rust tokenizer's batch encode in this process (it threads on its own).",
        "",
    ]
    if min(m["load_average_1_5_15_before"][0], m["load_average_1_5_15_after"][0]) >= m["cores"] - 1:
        lines += [
            f"The load average was near or above the {m['cores']} cores throughout: the parallel contenders "
            "found no idle core to run on, so their wall-clock ratio shows their overhead more than their "
            "speed-up; tokens per CPU second compares the work each spends per token.",
            "",
        ]
    with open(os.path.join(out, MD_NAME), "w") as f:
        f.write("\n".join(lines))
