"""The multiprocess target for real: processes on this machine joined by jax.distributed on 127.0.0.1, each
with 4 CPU devices, collectives through gloo, launched by scripts/submit.py."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from run_testing import ENV, ROOT, curve, wait_for_step

QUICK = ["--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.checkpoint_every=0"]


def submit(workdir, *args):
    return [
        sys.executable,
        os.path.join(ROOT, "scripts", "submit.py"),
        "--config=configs/lm.py:smoke",
        f"--workdir={workdir}",
        *args,
    ]


def test_two_processes_train_like_one(tmp_path):
    """2 processes x 4 devices and 1 process x 8 devices: same mesh (data=2 fsdp=2 tensor=2), same losses."""
    steps = ["--config.train.steps=6", *QUICK]
    multi = subprocess.Popen(
        submit(
            tmp_path / "multi",
            "--target=multiprocess",
            "--num_processes=2",
            "--devices_per_process=4",
            *steps,
        ),
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    single = subprocess.run(
        submit(tmp_path / "single", "--target=local", *steps),
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out, err = multi.communicate(timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert multi.returncode == 0, err[-3000:]
    assert "[launcher] all processes exited 0" in err
    logs = [open(tmp_path / "multi" / "logs" / f"process_{i}.log", errors="replace").read() for i in (0, 1)]
    assert "jax.distributed: process 0/2, 4 local of 8 devices" in logs[0]
    assert "jax.distributed: process 1/2, 4 local of 8 devices" in logs[1]

    want, got = (curve(tmp_path / name, keys=("loss", "grad_norm")) for name in ("single", "multi"))
    assert sorted(got) == list(range(1, 7)) and sorted(want) == sorted(got)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-6)
    assert got[6][0] < got[1][0] - 0.5
    # written once, by process 0
    assert len(open(tmp_path / "multi" / "metrics.jsonl").readlines()) == 6
    assert (tmp_path / "multi" / "loss.png").exists() and (tmp_path / "multi" / "config.json").exists()
    assert json.loads((tmp_path / "multi" / "status.json").read_text())["state"] == "exited"


def test_killed_process_fails_the_job_instead_of_hanging(tmp_path):
    launcher = subprocess.Popen(
        submit(
            tmp_path, "--target=multiprocess", "--heartbeat_timeout=10", "--config.train.steps=100000", *QUICK
        ),
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(tmp_path, 2, launcher)
    victim = json.loads((tmp_path / "status.json").read_text())["pids"][1]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    _, err = launcher.communicate(timeout=240)
    assert launcher.returncode != 0
    # The survivor stopped by itself (JAX's heartbeat timeout), not because the launcher killed it.
    assert time.time() - killed_at < 90
    assert "process 1: killed by SIGKILL" in err, err[-3000:]
    survivor = next(line for line in err.splitlines() if "  process 0:" in line)
    assert "terminated by the launcher" not in survivor, survivor
    assert "another task died" in err or "heartbeat timeout" in err, err[-3000:]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_codes"][1] == -signal.SIGKILL


def test_sigterm_to_one_process_checkpoints_all_at_one_step(tmp_path):
    """Preemption notices reach hosts at different times; every process must still stop at the same step."""
    args = ["--target=multiprocess", "--heartbeat_timeout=20", *QUICK]
    launcher = subprocess.Popen(
        submit(tmp_path, "--config.train.steps=100000", *args),
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(tmp_path, 3, launcher)
    os.kill(json.loads((tmp_path / "status.json").read_text())["pids"][1], signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, err[-3000:]
    logs = [open(tmp_path / "logs" / f"process_{i}.log", errors="replace").read() for i in (0, 1)]
    saved = [log.split("SIGTERM: saved checkpoint at step ")[1].split(";")[0] for log in logs]
    assert saved[0] == saved[1], saved
    # the same command resumes from there
    step = int(saved[0])
    rerun = subprocess.run(
        submit(tmp_path, f"--config.train.steps={step + 2}", *args),
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert max(curve(tmp_path)) == step + 2
