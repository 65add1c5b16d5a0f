"""Inference benchmarks on CPU, one process: decode tokens/s vs slots against a no-cache baseline, server
latency (time to first token, inter-token) under Poisson client load, KV-cache bytes per token vs analytic.

  python experiments/bench_inference.py --out=benchmarks/inference
  python experiments/bench_inference.py --render_only --out=benchmarks/inference

Writes results.json, README.md and throughput.png into --out. The work is in jaxpar/bench/inference.py.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxpar.bench import inference
from jaxpar.launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm.py:smoke", "Model measured (random weights).")
_OUT = flags.DEFINE_string("out", "benchmarks/inference", "Output folder for results.json, README.md, plots.")
_SERVING_SLOTS = flags.DEFINE_integer("serving_slots", 8, "Engine slots behind the server.")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Rewrite README.md from --out/results.json; no runs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _RENDER_ONLY.value:
        inference.render(_OUT.value)
        return
    logging.set_verbosity(logging.INFO)
    config_name = config_flags.get_config_filename(flags.FLAGS["config"])
    inference.run(_OUT.value, _CONFIG.value, config_name, _SERVING_SLOTS.value)


if __name__ == "__main__":
    cli.check_config_flags(default="configs/lm.py:smoke")  # a misspelled --config.KEY: one line
    app.run(main)
