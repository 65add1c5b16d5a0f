"""MoE benchmarks on 8 simulated CPU devices: all-to-all bytes of the compiled train step vs the analytic
count, per-device memory for expert = 1..8, and the dropped-token fraction vs capacity factor after a
short training run on the smoke corpus.

  python experiments/bench_moe.py --out=benchmarks/moe
  python experiments/bench_moe.py --render_only --out=benchmarks/moe

Writes results.json and README.md into --out. The work is in jaxpar/bench/moe.py.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxpar.bench import moe
from jaxpar.launch import cli
from jaxpar.machine import simulate_cpu_devices

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm.py:moe_smoke", "The MoE config measured.")
_OUT = flags.DEFINE_string("out", "benchmarks/moe", "Output folder for results.json, README.md and plots.")
_STEPS = flags.DEFINE_integer("steps", 40, "Training steps per capacity factor.")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Rewrite README.md from --out/results.json; no runs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _RENDER_ONLY.value:
        moe.render(_OUT.value)
        return
    simulate_cpu_devices(moe.DEVICES)
    logging.set_verbosity(logging.INFO)
    moe.run(_OUT.value, _CONFIG.value, _STEPS.value)


if __name__ == "__main__":
    cli.check_config_flags(default="configs/lm.py:moe_smoke")  # a misspelled --config.KEY: one line
    app.run(main)
