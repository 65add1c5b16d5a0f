"""Optimizer benchmarks on 8 simulated CPU devices: loss after N steps for AdamW, Muon, GaLore and SOAP at
their best of three learning rates, optimizer-state bytes, step time vs AdamW (interleaved, one process),
collective bytes vs analytic.

  python experiments/bench_optimizers.py --out=benchmarks/optimizers
  python experiments/bench_optimizers.py --compiled_only --out=benchmarks/optimizers
  python experiments/bench_optimizers.py --render_only --out=benchmarks/optimizers

Writes results.json, README.md and loss.png into --out. The work is in jaxpar/bench/optimizers.py.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxpar.bench import optimizers
from jaxpar.launch import cli
from jaxpar.machine import simulate_cpu_devices

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm.py:smoke", "The model and mesh measured.")
_OUT = flags.DEFINE_string(
    "out", "benchmarks/optimizers", "Output folder for results.json, README.md, loss.png."
)
_STEPS = flags.DEFINE_integer("steps", 100, "Training steps per optimizer and learning rate.")
_COMPILED_ONLY = flags.DEFINE_bool("compiled_only", False, "Only compile: state bytes, collectives, memory.")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Rewrite README.md and loss.png from results.json.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _RENDER_ONLY.value:
        optimizers.render(_OUT.value)
        return
    simulate_cpu_devices(optimizers.DEVICES)
    logging.set_verbosity(logging.INFO)
    if _COMPILED_ONLY.value:
        optimizers.run_compiled_only(_OUT.value, _CONFIG.value, _STEPS.value)
        return
    optimizers.run(_OUT.value, _CONFIG.value, _STEPS.value)


if __name__ == "__main__":
    cli.check_config_flags(default="configs/lm.py:smoke")  # a misspelled --config.KEY: one line
    app.run(main)
