"""One run per workdir: the lock both training loops take on <workdir>/.lock (jaxpar.train.workdir)."""

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from configs import lm, marl
from jaxpar.config import ConfigError, from_config_dict
from jaxpar.rl import config as rl_config, loop as rl_loop
from jaxpar.train import loop as lm_loop, workdir as workdir_lib


class Compiled(Exception):
    """Raised in place of building the program: the run got past its lock."""


@pytest.fixture
def held(tmp_path):
    """<tmp_path>/run locked the way another run's process 0 holds it: flock on .lock, owner inside."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"host": "node-7", "pid": 4242}).encode())
    yield run_dir
    os.close(fd)


def _refuse_build(*args, **kwargs):
    raise Compiled


def test_lm_run_refuses_a_workdir_in_use(held, monkeypatch):
    monkeypatch.setattr(lm_loop.build_lib, "build", _refuse_build)
    run = from_config_dict(lm.get_config("smoke"))
    with pytest.raises(ConfigError, match=r"in use by pid 4242 on host node-7.*--workdir"):
        lm_loop.train(run, str(held))
    assert os.listdir(held) == [".lock"]  # refused before writing anything


def test_marl_run_refuses_a_workdir_in_use(held, monkeypatch):
    monkeypatch.setattr(rl_loop, "build", _refuse_build)
    run = rl_config.from_config_dict(marl.get_config("smoke"))
    with pytest.raises(ConfigError, match=r"in use by pid 4242 on host node-7"):
        rl_loop.train(run, str(held))
    assert os.listdir(held) == [".lock"]


def test_lock_is_released_when_the_run_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_loop.build_lib, "build", _refuse_build)
    run = from_config_dict(lm.get_config("smoke"))
    for _ in range(2):  # a failed run releases the lock: the next one gets as far
        with pytest.raises(Compiled):
            lm_loop.train(run, str(tmp_path))
    with workdir_lib.exclusive(str(tmp_path)):
        pass
    assert (tmp_path / ".lock").read_text() == ""  # no owner left behind, so no stale-lock warning next


def test_second_holder_is_refused_with_the_owner(tmp_path):
    with workdir_lib.exclusive(str(tmp_path)):
        owner = json.loads((tmp_path / ".lock").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {os.getpid()} on host"):
            with workdir_lib.exclusive(str(tmp_path)):
                pass
        with workdir_lib.exclusive(str(tmp_path), enabled=False):  # processes other than 0 take no lock
            pass


def test_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    """The OS drops a dead process's flock; its owner line stays and names it in the warning."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from jaxpar.train import workdir; lock = workdir.exclusive(sys.argv[1]); "
            "lock.__enter__(); print('held', flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {holder.pid}"):
        with workdir_lib.exclusive(str(tmp_path)):
            pass
    holder.kill()
    holder.wait()
    with caplog.at_level(logging.WARNING):
        with workdir_lib.exclusive(str(tmp_path)):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"pid {holder.pid}" in caplog.text and "stale" in caplog.text
