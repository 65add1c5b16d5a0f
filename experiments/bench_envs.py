"""Env-steps/s of jaxpar's MPE envs against JaxMARL's ports and mpe2, and scaling over simulated devices.

  python experiments/bench_envs.py --out=benchmarks/envs

Writes results.json, README.md (tables) and throughput.png into --out. JaxMARL is optional: install it
(`pip install --no-deps jaxmarl==0.2.0 jaxtyping`) to get its columns; without it they are left out.
"""

import os
import pathlib

from absl import app, flags

from jaxpar.envs import bench

_ENVS = flags.DEFINE_list("envs", ["simple_spread_v3", "simple_tag_v3", "simple_reference_v3"], "Env ids.")
_BATCH = flags.DEFINE_list("num_envs", ["1", "64", "1024", "8192"], "Batch sizes.")
_STEPS = flags.DEFINE_list(
    "scan_steps", ["1000", "500", "100", "50"], "Scan length per batch size (same order)."
)
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions per cell (median reported).")
_MPE2_STEPS = flags.DEFINE_integer("mpe2_steps", 2000, "Steps per timed mpe2 loop.")
_JAXMARL = flags.DEFINE_bool("jaxmarl", True, "Measure JaxMARL too (needs it installed).")
_SCALING_DEVICES = flags.DEFINE_list("scaling_devices", ["1", "2", "4", "8"], "Device counts; empty to skip.")
_SCALING_ENVS = flags.DEFINE_integer("scaling_num_envs", 8192, "Batch size for the scaling runs.")
_SCALING_STEPS = flags.DEFINE_integer("scaling_steps", 50, "Scan length for the scaling runs.")
_OUT = flags.DEFINE_string("out", "benchmarks/envs", "Directory for results.json, README.md, throughput.png.")


def main(argv):
    del argv
    steps = dict(zip(map(int, _BATCH.value), map(int, _STEPS.value)))
    results = {"machine": bench.machine()}
    results["throughput"] = bench.throughput(
        _ENVS.value, list(steps), steps.__getitem__, _REPS.value, _MPE2_STEPS.value, _JAXMARL.value
    )
    if _SCALING_DEVICES.value:
        results["scaling"] = bench.scaling(
            _ENVS.value[0],
            _SCALING_ENVS.value,
            _SCALING_STEPS.value,
            [int(d) for d in _SCALING_DEVICES.value],
            _REPS.value,
        )
    results["load_average_at_end"] = os.getloadavg()
    bench.write_report(results, pathlib.Path(_OUT.value))
    print(f"wrote {_OUT.value}/README.md")


if __name__ == "__main__":
    app.run(main)
