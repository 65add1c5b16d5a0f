"""One run to launch: an experiment entry point, a config file with its preset, overrides, a workdir.

Every target (local, multiprocess, slurm, tpu-vm) turns a `Job` into the same command line, the one a
person would type: `python experiments/train_lm.py --config=configs/lm.py:smoke --workdir=DIR
--config.KEY=VALUE ...`. Each workdir gets `launch.json` (what was launched, how) and `status.json` (what
became of it), which `scripts/collect.py` reads back.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH_FILE = "launch.json"
STATUS_FILE = "status.json"


class LaunchError(ValueError):
    """Bad launcher input; the message names the value and the fix."""


def split_config_arg(config_arg: str) -> tuple[str, str | None]:
    """'configs/lm.py:smoke' -> ('configs/lm.py', 'smoke')."""
    path, sep, preset = config_arg.partition(":")
    return path, (preset if sep else None)


def default_entry(config_path: str) -> str:
    """configs/<family>.py -> experiments/train_<family>.py, beside the configs folder."""
    config_path = os.path.abspath(config_path)
    family = os.path.splitext(os.path.basename(config_path))[0]
    root = os.path.dirname(os.path.dirname(config_path))
    entry = os.path.join(root, "experiments", f"train_{family}.py")
    if not os.path.exists(entry):
        raise LaunchError(
            f"no entry point for config family {family!r}: {entry} does not exist; pass "
            "--entry=experiments/<script>.py."
        )
    return entry


def format_value(value: Any) -> str:
    """A config value as `--config.KEY=VALUE` text that ml_collections' config_flags parses back."""
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    raise LaunchError(
        f"cannot pass {value!r} ({type(value).__name__}) as a config override; use a bool, "
        "number, string or tuple."
    )


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
    return [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]


def apply_overrides(config, overrides: Mapping[str, Any]):
    """A copy of `config` with dotted-key overrides set, failing on unknown keys or wrong types the way the
    experiment would, but before anything is submitted."""
    import ml_collections

    config = ml_collections.ConfigDict(config.to_dict()) if config is not None else None
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        try:
            for name in parents:
                node = node[name]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = value
        except (KeyError, TypeError, AttributeError) as error:
            raise LaunchError(
                f"override config.{key}={value!r} does not fit the config ({type(error).__name__}: "
                f"{error}); check the key against the config file."
            ) from None
    return config


@dataclasses.dataclass(frozen=True)
class Job:
    entry: str  # path of the experiment script
    config: str  # 'path/to/config.py[:preset]'
    workdir: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    total_steps: int | None = None  # config.train.steps when the config has it: how collect tells "finished"

    def args(self, root: str | None = None) -> list[str]:
        """Entry script and flags; paths relative to `root` when given (for a copy of the code elsewhere)."""
        path, preset = split_config_arg(self.config)
        entry, config_path = os.path.abspath(self.entry), os.path.abspath(path)
        if root is not None:
            entry, config_path = os.path.relpath(entry, root), os.path.relpath(config_path, root)
        config = config_path + (f":{preset}" if preset is not None else "")
        return [entry, f"--config={config}", f"--workdir={self.workdir}", *override_flags(self.overrides)]

    def argv(self, python: str) -> list[str]:
        return [python, *self.args()]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_json(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_launch_record(job: Job, target: str, **extra) -> None:
    record = {
        "target": target,
        "created": now(),
        "entry": os.path.abspath(job.entry),
        "config": job.config,
        "workdir": os.path.abspath(job.workdir),
        "overrides": dict(job.overrides),
        "total_steps": job.total_steps,
        "command": job.argv("python")[1:],
        **extra,
    }
    write_json(os.path.join(job.workdir, LAUNCH_FILE), record)


def write_status(workdir: str, state: str, **info) -> None:
    write_json(os.path.join(workdir, STATUS_FILE), {"state": state, "time": now(), **info})
