"""Host offload on 8 simulated CPU devices: compiled and predicted memory per config.offload choice,
losses against no offload, step time relative to no offload (interleaved, one process).

  python experiments/bench_offload.py --out=benchmarks/memory/offload
  python experiments/bench_offload.py --render_only --out=benchmarks/memory/offload

Writes results.json and README.md into --out. The work is in jaxpar/bench/offload.py.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxpar.bench import offload
from jaxpar.launch import cli
from jaxpar.machine import simulate_cpu_devices

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm.py:smoke", "The model and mesh measured.")
_OUT = flags.DEFINE_string("out", "benchmarks/memory/offload", "Output folder for results.json, README.md.")
_STEPS = flags.DEFINE_integer("steps", 5, "Training steps per choice whose losses are compared.")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Rewrite README.md from results.json.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _RENDER_ONLY.value:
        offload.render(_OUT.value)
        return
    simulate_cpu_devices(offload.DEVICES)
    logging.set_verbosity(logging.WARNING)
    offload.run(_OUT.value, _CONFIG.value, _STEPS.value)


if __name__ == "__main__":
    cli.check_config_flags(default="configs/lm.py:smoke")  # a misspelled --config.KEY: one line
    app.run(main)
