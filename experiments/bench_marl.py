"""MARL benchmarks: learning runs of configs/marl.py presets, throughput on 1 vs N simulated devices, and
the committed report (benchmarks/marl/results.json, README.md, PNG curves).

  python experiments/bench_marl.py --mode=learn --presets=ippo_spread,mappo_spread --workroot=/tmp/marl_bench
  python experiments/bench_marl.py --mode=throughput --devices=1,2,8
  python experiments/bench_marl.py --mode=report --workroot=/tmp/marl_bench
  python experiments/bench_marl.py --mode=compare --steps=2000000 --seeds=3   # needs JaxMARL 0.2.0

`learn` trains each preset with experiments/train_marl.py's loop into WORKROOT/<preset> (resuming if it is
there) and records the run's summary; `--overrides` (dotted key=value, comma separated) shrink a budget.
`throughput` times the whole training loop (rollout + GAE + PPO epochs, all seeds) of one preset, after
compilation, in a fresh process per device count (the count is fixed when jax starts). `compare` trains,
in this one process and one after another, jaxpar with JaxMARL's IPPO-FF settings (ippo_spread_jaxmarl),
JaxMARL 0.2.0's env with its IPPO-FF baseline re-implemented in jaxpar/bench/jaxmarl_ippo.py (the script is
not in the wheel), and jaxpar's tuned ippo_spread, each timed with compile, and replays every final policy in
mpe2 (into benchmarks/marl/compare; JaxMARL: `pip install --no-deps jaxmarl==0.2.0 jaxtyping
wadler_lindig`). The work is in jaxpar/bench/marl.py.
"""

import os

from absl import app, flags, logging

from jaxpar.bench import marl

_MODE = flags.DEFINE_enum("mode", "report", ["learn", "throughput", "report", "compare"], "What to run.")
_PRESETS = flags.DEFINE_list("presets", ["ippo_spread"], "configs/marl.py presets for --mode=learn.")
_OVERRIDES = flags.DEFINE_list(
    "overrides", [], "key=value config overrides for every preset, e.g. train.total_env_steps=2000000."
)
_WORKROOT = flags.DEFINE_string("workroot", "/tmp/marl_bench", "Where learning runs keep their workdirs.")
_OUT = flags.DEFINE_string("out", "benchmarks/marl", "Where results.json, README.md and plots go.")
_DEVICES = flags.DEFINE_list("devices", ["1", "8"], "Simulated CPU device counts for --mode=throughput.")
_THROUGHPUT_PRESET = flags.DEFINE_string(
    "throughput_preset", "ippo_spread", "Preset timed by --mode=throughput."
)
_UPDATES = flags.DEFINE_integer("updates", 20, "Updates per timed call (--mode=throughput).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per device count; the best is reported.")
_STEPS = flags.DEFINE_integer("steps", 2_000_000, "Env steps per seed for --mode=compare.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per contender for --mode=compare.")
_EPISODES = flags.DEFINE_integer("episodes", 32, "mpe2 replay episodes per seed and mode (--mode=compare).")

# The presets of this repository, whatever the working directory (the throughput children get it too).
CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "marl.py")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    if _MODE.value == "learn":
        marl.learn(CONFIG_FILE, _PRESETS.value, _OVERRIDES.value, _WORKROOT.value, _OUT.value)
    elif _MODE.value == "throughput":
        marl.throughput(
            CONFIG_FILE,
            _THROUGHPUT_PRESET.value,
            [int(n) for n in _DEVICES.value],
            _UPDATES.value,
            _REPEATS.value,
            _OUT.value,
        )
    elif _MODE.value == "compare":
        out = _OUT.value if _OUT.value != _OUT.default else os.path.join(_OUT.default, "compare")
        workroot = os.path.join(_WORKROOT.value, "compare")
        marl.compare(CONFIG_FILE, _STEPS.value, _SEEDS.value, _EPISODES.value, workroot, out)
    else:
        marl.report(_WORKROOT.value, _OUT.value)


if __name__ == "__main__":
    app.run(main)
