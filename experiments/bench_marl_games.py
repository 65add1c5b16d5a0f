"""The Overcooked / Hanabi learning benchmarks' committed report, from runs of experiments/train_marl.py:

  python experiments/train_marl.py --config=configs/marl.py:ippo_overcooked --workdir=RUNS/ippo_overcooked
  python experiments/bench_marl_games.py --game=overcooked --workroot=RUNS --out=benchmarks/marl/overcooked

Reads RUNS/<preset>/metrics.jsonl for each preset of the game (jaxpar.bench.marl_games.GAMES) and writes
results.json (per-seed curves binned by env steps, wall time, machine, versions, load), README.md and a
learning-curve PNG into --out. --load_log: lines `<unix time> <1-min load> ...` sampled during the runs.
"""

from absl import app, flags

from jaxpar.bench import marl_games

_GAME = flags.DEFINE_enum("game", "overcooked", sorted(marl_games.GAMES), "Which game's presets.")
_WORKROOT = flags.DEFINE_string(
    "workroot", "/tmp/marl_games", "Folder of the runs' workdirs (one per preset)."
)
_OUT = flags.DEFINE_string("out", None, "Report folder (default benchmarks/marl/<game>).")
_LOAD_LOG = flags.DEFINE_string("load_log", None, "Load averages sampled during the runs (optional).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    out = _OUT.value or f"benchmarks/marl/{_GAME.value}"
    results = marl_games.report(_GAME.value, _WORKROOT.value, out, _LOAD_LOG.value)
    for preset, run in results["runs"].items():
        print(preset, {k: v for k, v in run.items() if k not in ("curve", "config", "command")})


if __name__ == "__main__":
    app.run(main)
