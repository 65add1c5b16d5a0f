"""Env-steps/s of jaxpar's environments (MPE, Overcooked, Hanabi) against JaxMARL's versions and the
original Python packages (mpe2, overcooked-ai, hanabi-learning-environment), and scaling over simulated
devices.

  python experiments/bench_envs.py --out=benchmarks/envs --load_note="what else ran"
  python experiments/bench_envs.py --envs=hanabi_2p,overcooked_cramped_room --scaling_devices= --out=/tmp/x
  python experiments/bench_envs.py --render_only --out=benchmarks/envs

Writes results.json, README.md (tables) and throughput.png into --out, all from this one run. JaxMARL is
optional: install it (`pip install --no-deps jaxmarl==0.2.0 jaxtyping`) to get its columns, or pass
--nojaxmarl. The work is in jaxpar/bench/envs.py; --envs names its CASES. The whole default run took 21
minutes on 2 loaded cores (most of it compiling 79 programs); --envs measures a subset.
"""

from absl import app, flags

from jaxpar.bench import envs

_ENVS = flags.DEFINE_list("envs", list(envs.CASES), f"Cases to measure, of {list(envs.CASES)}.")
_BATCH = flags.DEFINE_list("num_envs", ["1", "64", "1024", "8192"], "Batch sizes.")
_STEPS = flags.DEFINE_list(
    "scan_steps",
    ["1000", "500", "100", "50"],
    "Scan length per batch size (same order), times each case's scale (shorter for slower envs).",
)
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions per cell (median reported).")
_ORIGINAL_SCALE = flags.DEFINE_float(
    "original_scale", 1.0, "Multiplies each case's steps per timed repetition of the original package."
)
_JAXMARL = flags.DEFINE_bool("jaxmarl", True, "Measure JaxMARL too (needs it installed).")
_SCALING_DEVICES = flags.DEFINE_list("scaling_devices", ["1", "2", "4", "8"], "Device counts; empty to skip.")
_SCALING_ENVS = flags.DEFINE_integer("scaling_num_envs", 8192, "Batch size for the scaling runs.")
_SCALING_STEPS = flags.DEFINE_integer("scaling_steps", 50, "Scan length for the scaling runs.")
_LOAD_NOTE = flags.DEFINE_string("load_note", "", "What else ran on the machine, for the README.")
_OUT = flags.DEFINE_string("out", "benchmarks/envs", "Directory for results.json, README.md, throughput.png.")
_RENDER_ONLY = flags.DEFINE_bool(
    "render_only", False, "Rewrite README.md and throughput.png from --out/results.json; no runs."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _RENDER_ONLY.value:
        envs.render(_OUT.value)
        return
    envs.run(
        _OUT.value,
        _ENVS.value,
        [int(b) for b in _BATCH.value],
        [int(t) for t in _STEPS.value],
        reps=_REPS.value,
        original_scale=_ORIGINAL_SCALE.value,
        with_jaxmarl=_JAXMARL.value,
        scaling_devices=[int(d) for d in _SCALING_DEVICES.value],
        scaling_num_envs=_SCALING_ENVS.value,
        scaling_steps=_SCALING_STEPS.value,
        load_note=_LOAD_NOTE.value,
    )


if __name__ == "__main__":
    app.run(main)
