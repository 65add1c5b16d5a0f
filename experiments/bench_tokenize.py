"""Tokenization throughput of scripts/prepare_data.py (worker processes) against a single-process loop,
measured alternating in one process on the stdlib corpus.

  python experiments/bench_tokenize.py --out=benchmarks/interop
  python experiments/bench_tokenize.py --render_only --out=benchmarks/interop

Writes tokenize.json and tokenize.md into --out. The work is in jaxpar/bench/tokenize.py.
"""

from absl import app, flags

from jaxpar.bench import tokenize

_OUT = flags.DEFINE_string("out", "benchmarks/interop", "Directory for tokenize.json and tokenize.md.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "tokenizer.json or HF dir; empty: train a BPE on the corpus."
)
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary of the BPE trained when --tokenizer is empty.")
_WORKERS = flags.DEFINE_list("workers", ["2"], "Worker counts of prepare_data to measure.")
_FILES = flags.DEFINE_integer("files", 8, "The corpus is spread over this many .jsonl files.")
_MAX_MB = flags.DEFINE_float("max_mb", 6.0, "Corpus size cap (MB of text, stdlib modules in sorted order).")
_REPS = flags.DEFINE_integer("reps", 3, "Repetitions per contender (median reported).")
_RENDER_ONLY = flags.DEFINE_bool(
    "render_only", False, "Rewrite tokenize.md from --out/tokenize.json; no runs."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _RENDER_ONLY.value:
        tokenize.render(_OUT.value)
        return
    tokenize.run(
        _OUT.value,
        tokenizer_path=_TOKENIZER.value,
        vocab_size=_VOCAB.value,
        workers=[int(n) for n in _WORKERS.value],
        files=_FILES.value,
        max_mb=_MAX_MB.value,
        reps=_REPS.value,
    )


if __name__ == "__main__":
    app.run(main)
