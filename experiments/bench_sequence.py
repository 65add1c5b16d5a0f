"""Sequence parallelism, measured on compiled programs (8 simulated CPU devices):

  python experiments/bench_sequence.py --out=benchmarks/sequence
  python experiments/bench_sequence.py --render_only --out=benchmarks/sequence

Part 1, bytes: collective bytes per layer per step (forward + backward) of each variant's attention
  (ring, ulysses, usp, allgather) and of LASP-2 linear attention, read off the compiled program with
  jaxpar/parallel/analysis.py, next to the analytic expectation (jaxpar.train.costs.sequence_terms),
  for sequence = 2, 4, 8. Then the same collectives counted inside the real train step of the Llama model
  (per layer), to show the model runs exactly these.
Part 2, memory: per-device memory of the compiled train step vs sequence length for sequence = 1, 2, 4, 8
  (XLA buffer assignment), and the longest sequence that fits a fixed per-device budget.
Part 3, balance: query-key pairs each device's ring computes under causal masking, contiguous vs zigzag
  layout, counted while the ring runs (a counting block function) and from the static schedule.

Writes results.json (a run of some --parts keeps the others' results), README.md and memory.png into
--out. The work is in jaxpar/bench/sequence.py.
"""

from absl import app, flags

from jaxpar.bench import sequence
from jaxpar.machine import simulate_cpu_devices

_OUT = flags.DEFINE_string("out", "benchmarks/sequence", "Directory for results.json and README.md.")
_PARTS = flags.DEFINE_list("parts", list(sequence.PARTS), "Which parts to run.")
_BUDGET_MIB = flags.DEFINE_float("budget_mib", 1024.0, "Per-device memory budget for part 2 (MiB).")
_RENDER_ONLY = flags.DEFINE_bool(
    "render_only", False, "Rewrite README.md and memory.png from --out/results.json; no runs."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _RENDER_ONLY.value:
        sequence.render(_OUT.value)
        return
    simulate_cpu_devices(sequence.DEVICES)
    sequence.run(_OUT.value, _PARTS.value, _BUDGET_MIB.value)


if __name__ == "__main__":
    app.run(main)
