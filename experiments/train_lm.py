"""Train a language model.

  python experiments/train_lm.py --config=configs/lm.py:smoke --workdir=/tmp/lm [--config.train.steps=50 ...]

Rerunning with the same --workdir resumes from its latest checkpoint.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxpar.config import ConfigError, from_config_dict
from jaxpar.launch import cli
from jaxpar.launch.distributed import maybe_initialize
from jaxpar.plan import suggest
from jaxpar.train import fit
from jaxpar.train.checkpoint import CheckpointError
from jaxpar.train.loop import NonFiniteError, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset, e.g. configs/lm.py:smoke.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots, config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    maybe_initialize()  # joins a multi-process job when a launcher (scripts/submit.py, srun) asks for it
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        run = from_config_dict(_CONFIG.value)
        final = train(run, _WORKDIR.value)
    except fit.DoesNotFit as error:  # the loop's fit check: name the planner's best fitting alternative
        sys.exit(f"error: {error} {suggest.alternative(run, jax.device_count(), error.bytes_limit)}")
    except (ConfigError, CheckpointError, NonFiniteError) as error:
        sys.exit(f"error: {error}")
    print("final:", {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})


if __name__ == "__main__":
    cli.check_config_flags()  # a misspelled --config.KEY: one line, before absl's flag parser
    app.run(main)
