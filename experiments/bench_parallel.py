"""Collective bytes, memory and FLOPs of the train step under each parallel strategy, read off the
compiled program (jaxpar/parallel/analysis.py) and checked against the analytic model in
jaxpar/train/costs.py.

  python experiments/bench_parallel.py --config=configs/lm.py:smoke --out=benchmarks/parallel
  python experiments/bench_parallel.py --render_only --out=benchmarks/parallel

Part 1 compiles the --config model on 8 simulated CPU devices for DP, FSDP, TP and two combinations.
Part 2 compiles the real-size --presets for a --preset_devices mesh (64) in a child process that
simulates that many CPU devices (the count is fixed when jax starts), from abstract inputs only, so
nothing is allocated. Writes results.json and README.md (tables) into --out. The work is in
jaxpar/bench/parallel.py.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxpar.bench import parallel
from jaxpar.config import from_config_dict
from jaxpar.launch import cli
from jaxpar.machine import simulate_cpu_devices

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm.py:smoke", "Model for part 1 (8 devices).")
_OUT = flags.DEFINE_string("out", "benchmarks/parallel", "Directory for results.json and README.md.")
_PRESETS = flags.DEFINE_list(
    "presets",
    ["configs/lm.py:llama_1b", "configs/lm.py:llama_7b"],
    "Real-size configs (file:preset) compiled for --preset_devices devices.",
)
_PRESET_DEVICES = flags.DEFINE_integer("preset_devices", 64, "Simulated devices for the --presets.")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Rewrite README.md from --out/results.json; no runs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _RENDER_ONLY.value:
        parallel.render(_OUT.value)
        return
    simulate_cpu_devices(parallel.PART1_DEVICES)
    config_name = config_flags.get_config_filename(flags.FLAGS["config"])
    parallel.run(
        _OUT.value, from_config_dict(_CONFIG.value), config_name, _PRESETS.value, _PRESET_DEVICES.value
    )


if __name__ == "__main__":
    cli.check_config_flags(default="configs/lm.py:smoke")  # a misspelled --config.KEY: one line
    app.run(main)
