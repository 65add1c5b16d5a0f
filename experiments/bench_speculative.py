"""Speculative sampling benchmark on CPU: trains a target (smoke) and a small draft once, then measures
tokens per decoding round, target forwards per token and wall-clock time against plain decoding for
k = 1..8 drafted tokens, at 1 and 8 slots, greedy and at temperature 1, in one process.

  python experiments/bench_speculative.py --out=benchmarks/speculative --runs=/tmp/jaxpar_speculative
  python experiments/bench_speculative.py --render_only --out=benchmarks/speculative
  python experiments/bench_speculative.py --medusa  # Medusa heads on the same target, added to results.json

Writes results.json, README.md and acceptance.png into --out. The work is in jaxpar/bench/speculative.py.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxpar.bench import speculative
from jaxpar.launch import cli
from jaxpar.machine import simulate_cpu_devices

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm.py:smoke", "The target's config (trained).")
_OUT = flags.DEFINE_string(
    "out", "benchmarks/speculative", "Output folder for results.json, README.md, plots."
)
_RUNS = flags.DEFINE_string("runs", "/tmp/jaxpar_speculative", "Where the target and draft runs are trained.")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Rewrite README.md from --out/results.json; no runs.")
_MEDUSA = flags.DEFINE_bool("medusa", False, "Only the Medusa rows (heads trained on the target), added.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _RENDER_ONLY.value:
        speculative.render(_OUT.value)
        return
    simulate_cpu_devices(8)  # training's mesh; inference runs on the first device
    logging.set_verbosity(logging.INFO)
    if _MEDUSA.value:
        speculative.run_medusa(_OUT.value, _CONFIG.value, _RUNS.value)
    else:
        speculative.run(_OUT.value, _CONFIG.value, _RUNS.value)


if __name__ == "__main__":
    cli.check_config_flags(default="configs/lm.py:smoke")  # a misspelled --config.KEY: one line
    app.run(main)
