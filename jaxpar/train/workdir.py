"""One run per workdir. Two runs writing the same checkpoints and metrics would interleave them silently;
both training loops (LM and MARL) hold an exclusive lock on `<workdir>/.lock` for as long as they run.

The lock is `fcntl.flock`, so the operating system drops it when its process ends, however it ends; the
file holds the owner's host and pid for the message a second run gets, and is emptied (never deleted: a
deleted lock file lets two runs lock two different files) when the owner releases it. A file that still
names an owner whose lock the OS has dropped is what a killed run leaves behind: the next run takes it over
with a warning. Model-free: no jax here; in a multi-process job only process 0 takes the lock (every process
shares the workdir), so callers pass `enabled=jax.process_index() == 0`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys

from jaxpar.config import ConfigError, RunConfig, from_config_dict

LOCK_FILE = ".lock"
_log = logging.getLogger(__name__)


def read_run_config(workdir: str, flag: str = "--workdir") -> RunConfig:
    """The RunConfig a training run saved in `<workdir>/config.json`; `flag` names the setting that gave
    the folder, for the error when it is not a run's."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"{flag}={workdir!r}: {path} does not exist; give the workdir of a training run "
            "(experiments/train_lm.py --workdir=...)."
        )
    with open(path) as f:
        raw = json.load(f)
    raw.pop("resolved_mesh", None)
    return from_config_dict(raw)


class WorkdirBusyError(ConfigError):
    """Another live run holds the workdir's lock."""


def _describe(owner: dict) -> str:
    started = f", started {owner['started']}" if owner.get("started") else ""
    command = f", running {owner['command']!r}" if owner.get("command") else ""
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}{started}{command}"


def _read_owner(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace").strip()
    if not text:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        owner = None
    return owner if isinstance(owner, dict) else {"pid": "?", "host": f"? (lock file holds {text[:80]!r})"}


@contextlib.contextmanager
def exclusive(workdir: str, enabled: bool = True):
    """Holds `<workdir>/.lock` (creating the workdir) for the duration of the block; raises
    WorkdirBusyError naming the owner if another run holds it. With enabled=False, does nothing."""
    if not enabled:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _flock(fd, path):
            yield
            return
        stale = _read_owner(fd)
        if stale is not None:
            _log.warning(
                "took over the stale lock %s of %s, which ended without releasing it (killed or crashed); "
                "its checkpoints are resumed as usual.",
                path,
                _describe(stale),
            )
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: no owner left for the next run to warn about
    finally:
        os.close(fd)  # drops the flock


def _flock(fd: int, path: str) -> bool:
    """True once the lock is taken; WorkdirBusyError if another process holds it; False where the file
    system cannot lock (some Lustre mounts): the run goes ahead unlocked rather than not at all."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            _log.warning("cannot lock %s (%s); running without the one-run-per-workdir check.", path, error)
            return False
    owner = _read_owner(fd) or {}
    raise WorkdirBusyError(
        f"workdir {os.path.dirname(path)!r} is in use by {_describe(owner)} (it holds {path}); wait for that "
        "run to end or stop it, or give this run another --workdir."
    )
