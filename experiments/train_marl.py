"""Train (or evaluate) IPPO / MAPPO, or the value-based PQN learners (IQL, VDN, QMIX), on a jaxpar.envs
environment.

  python experiments/train_marl.py --config=configs/marl.py:ippo_spread --workdir=/tmp/marl
  python experiments/train_marl.py --config=configs/marl.py:ippo_spread --workdir=/tmp/marl --mode=eval
  python experiments/train_marl.py --config=configs/marl.py:pqn_vdn_spread --workdir=/tmp/vdn

A relative --config path that does not exist from the working directory is read from the repository, so
these commands work from any directory. Rerunning training with the same --workdir resumes from its
latest checkpoint. The workdir gets
metrics.jsonl, tensorboard/, checkpoints/, config.json and learning_curve.png; eval mode rolls out the
latest checkpoint of every seed (sampled and greedy actions; mean +- std over seeds) and writes eval.json
and eval.gif. For the Q-learners "sampled" acts epsilon-greedily with algo.eps_finish.
"""

import statistics
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxpar.config import ConfigError
from jaxpar.launch import cli
from jaxpar.launch.distributed import maybe_initialize
from jaxpar.rl.config import from_config_dict, resolve_config_argv
from jaxpar.rl.loop import eval_summary, evaluate, train
from jaxpar.train.checkpoint import CheckpointError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/marl.py:smoke."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots, config.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval"], "train (or resume), or evaluate the latest checkpoint."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    maybe_initialize()
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        run = from_config_dict(_CONFIG.value)
        if _MODE.value == "eval":
            result = evaluate(run, _WORKDIR.value)
            print(eval_summary(result))
            print(f"wrote {_WORKDIR.value}/eval.json" + (f" and {result['gif']}" if result["gif"] else ""))
            return
        final = train(run, _WORKDIR.value)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(
        "final:",
        {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items() if not isinstance(v, list)},
    )
    seeds = [x for x in final.get("return_per_seed", []) if x is not None]
    if seeds:
        print(
            f"return per agent per episode at update {final['step']}: {statistics.mean(seeds):.2f} +- "
            f"{statistics.pstdev(seeds):.2f} (std over {len(seeds)} seed(s)); curves: "
            f"{_WORKDIR.value}/learning_curve.png, metrics.jsonl"
        )


if __name__ == "__main__":
    try:
        sys.argv = resolve_config_argv(sys.argv)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    cli.check_config_flags()  # a misspelled --config.KEY: one line, before absl's flag parser
    app.run(main)
