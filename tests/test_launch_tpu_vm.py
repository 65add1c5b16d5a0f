"""The tpu-vm target's commands, pinned by golden files of `--dry_run` output (the repository path is
written as $REPO). Regenerate after an intended change:
    JAXPAR_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_launch_tpu_vm.py
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
TPU = ["--target=tpu-vm", "--tpu=my-v5p-32", "--zone=us-east5-a", "--dry_run"]

CASES = {
    "submit": (
        "submit.py",
        "--config=configs/lm.py:llama_1b",
        "--workdir=/mnt/shared/runs/llama_1b",
        "--project=my-project",
        "--config.train.steps=2000",
        "--config.mesh.fsdp=16",
        *TPU,
    ),
    "sweep": (
        "sweep.py",
        "--config=configs/lm.py:smoke",
        "--sweep=tiny",
        "--workdir=/mnt/shared/sweeps/tiny",
        "--config.train.steps=50",
        *TPU,
    ),
    "detach": (
        "submit.py",
        "--config=configs/lm.py:small",
        "--workdir=runs/small",
        "--tpu_worker=0",
        "--remote_dir=code/jaxpar",
        "--tpu_python=python3.12",
        "--detach",
        "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_latency_hiding_scheduler=true",
        *TPU,
    ),
    "sweep_detach": (
        "sweep.py",
        "--config=configs/lm.py:smoke",
        "--sweep=lr",
        "--workdir=/mnt/shared/sweeps/lr",
        "--detach",
        *TPU,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_matches_golden(case):
    name, *args = CASES[case]
    result = subprocess.run(
        [sys.executable, os.path.join("scripts", name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = result.stdout.replace(ROOT, "$REPO")
    path = os.path.join(GOLDEN, f"tpu_vm_{case}.txt")
    if os.environ.get("JAXPAR_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(got)
    with open(path) as f:
        assert got == f.read(), f"dry-run output differs from {path}; see the module docstring to regenerate"


def test_tpu_vm_needs_a_tpu_and_zone(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join("scripts", "submit.py"),
            "--config=configs/lm.py:smoke",
            f"--workdir={tmp_path}",
            "--target=tpu-vm",
            "--dry_run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode != 0 and "--tpu=NAME and --zone=ZONE" in result.stderr
    assert not os.listdir(tmp_path)  # nothing written for a remote target


@pytest.mark.parametrize("case", ["submit", "sweep_detach"])
def test_remote_commands_run_under_a_shell(case, tmp_path):
    """The quoting survives a real shell: each run step's --command, executed by sh in a stand-in remote home
    with a `python3` that records its arguments, starts the experiment with the intended flags."""
    import shlex
    import time

    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    (home / "jaxpar").mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/sh\necho "$JAXPAR_DISTRIBUTED $*" >> "$HOME/calls.txt"\n')
    (bin_dir / "python3").chmod(0o755)
    with open(os.path.join(GOLDEN, f"tpu_vm_{case}.txt")) as f:
        lines = [shlex.split(line) for line in f if line.startswith("gcloud compute tpus tpu-vm ssh")]
    runs = [
        arg.removeprefix("--command=") for argv in lines[1:] for arg in argv if arg.startswith("--command=")
    ]
    for remote in runs:
        subprocess.run(
            ["sh", "-c", remote],
            cwd=home,
            check=True,
            timeout=30,
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home)},
        )
    calls_path = home / "calls.txt"
    deadline = time.time() + 10  # detached runs finish in the background
    expected = 1 if case == "submit" else 3
    while time.time() < deadline and (
        not calls_path.exists() or len(calls_path.read_text().splitlines()) < expected
    ):
        time.sleep(0.1)
    calls = calls_path.read_text().splitlines()
    assert len(calls) == expected
    assert all(call.startswith("1 experiments/train_lm.py --config=configs/lm.py:") for call in calls)
    if case == "sweep_detach":
        assert calls[1].endswith(
            "--workdir=/mnt/shared/sweeps/lr/learning_rate=0.003 --config.optimizer.learning_rate=0.003"
        )
