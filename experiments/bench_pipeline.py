"""Pipeline schedules: timelines, bubble fractions against theory, per-device memory from compiled
memory analysis, and ppermute bytes per step against the analytic count.

  python experiments/bench_pipeline.py --out=benchmarks/pipeline
  python experiments/bench_pipeline.py --skip_compile --out=/tmp/pipeline    # part 1 only, seconds
  python experiments/bench_pipeline.py --render_only --out=benchmarks/pipeline

Part 1 (pure Python): every schedule's table drawn as a timeline PNG, its bubble fraction next to the
published formula, and the lockstep bubble when actions cost what they cost.
Part 2: matmul FLOPs of each action (F, fused B, ZB's B and W, the loss head) read off compiled
single-action programs of the model; those costs give the lockstep bubble, and the head's placement
(split over the vocabulary across all stages vs all on the last stage) is compared with them.
Part 3: the pipelined loss-and-gradient program compiled for 8 simulated CPU devices (pipeline=4 x
data=2): memory analysis for GPipe / 1F1B / interleaved / ZB-H1 at M = 8P and GPipe vs 1F1B over M, and
the collective-permute bytes read off the compiled HLO against `jaxpar.train.costs.expected_ppermute_bytes`.
Writes results.json, README.md and the PNGs into --out. The work is in jaxpar/bench/pipeline.py.
"""

from absl import app, flags

from jaxpar.bench import pipeline
from jaxpar.machine import simulate_cpu_devices

_OUT = flags.DEFINE_string("out", "benchmarks/pipeline", "Directory for results.json, README.md and PNGs.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Sequence length of the compiled programs.")
_ROWS = flags.DEFINE_integer("rows_per_shard", 1, "Rows per microbatch per data shard.")
_SKIP_COMPILE = flags.DEFINE_bool("skip_compile", False, "Only the pure-Python part 1.")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Rewrite README.md from --out/results.json; no runs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _RENDER_ONLY.value:
        pipeline.render(_OUT.value)
        return
    simulate_cpu_devices(pipeline.DEVICES)
    pipeline.run(_OUT.value, _SEQ.value, _ROWS.value, _SKIP_COMPILE.value)


if __name__ == "__main__":
    app.run(main)
