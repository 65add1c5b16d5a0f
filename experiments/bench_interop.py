#!/usr/bin/env python3
"""Hugging Face import benchmark: jaxpar's shard-by-shard safetensors reader vs transformers.from_pretrained
plus a plain device_put, on 8 simulated CPU devices (fsdp=8), ~0.1B to ~1.2B parameters, time and peak host
memory, each load in a fresh process, contenders alternating in one run.

  python experiments/bench_interop.py --out=benchmarks/interop [--sizes=0.1B,0.4B,1.2B --repeats=2]
  python experiments/bench_interop.py --render_only --out=benchmarks/interop

Writes results.json and README.md into --out. The work is in jaxpar/bench/interop.py.
"""

import tempfile

from absl import app, flags

from jaxpar.bench import interop

_OUT = flags.DEFINE_string("out", "benchmarks/interop", "Output folder for results.json and README.md.")
_SIZES = flags.DEFINE_list("sizes", list(interop.SIZES), f"Model sizes, of {list(interop.SIZES)}.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Loads per contender and size (the best is reported).")
_SCRATCH = flags.DEFINE_string(
    "scratch", None, "Where the random checkpoints are written (default: a temp dir)."
)
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Rewrite README.md from results.json.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    unknown = set(_SIZES.value) - set(interop.SIZES)
    if unknown:
        raise app.UsageError(f"--sizes: unknown {sorted(unknown)}; choose from {list(interop.SIZES)}")
    if _RENDER_ONLY.value:
        interop.render(_OUT.value)
        return
    with tempfile.TemporaryDirectory(dir=_SCRATCH.value) as scratch:
        interop.run(_OUT.value, _SIZES.value, _REPEATS.value, scratch)


if __name__ == "__main__":
    app.run(main)
