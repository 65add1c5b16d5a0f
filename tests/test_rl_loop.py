"""The MARL host loop as a user meets it: one compiled update program whatever the chunking, a message
before the long compile, evaluation over every seed (sampled and greedy), and --config from any working
directory."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_rl_train import smoke

from jaxpar.config import ConfigError
from jaxpar.rl import loop
from jaxpar.rl.config import REPO_ROOT, resolve_config_argv
from jaxpar.train.metrics import read_metrics

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compiled_programs():
    """Names of the programs XLA compiles inside the block."""
    names: list[str] = []

    def listener(event, _duration, **kwargs):
        if event == BACKEND_COMPILE:
            names.append(str(kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 seeds x 5 updates in calls of 2 (2 + 2 + 1): the update count is not a multiple of the chunk."""
    workdir = str(tmp_path_factory.mktemp("marl"))
    run = smoke(train=dict(num_seeds=2, total_env_steps=64 * 25 * 5, updates_per_call=2, checkpoint_every=0))
    err = io.StringIO()
    with compiled_programs() as names, contextlib.redirect_stderr(err):
        loop.train(run, workdir)
    return run, workdir, names, err.getvalue()


def test_uneven_chunks_compile_one_update_program(trained):
    run, workdir, names, _ = trained
    updates = [n for n in names if "updates" in n]
    assert len(updates) == 1, names  # before: the chunk of 2 and the remainder of 1
    assert [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))] == [1, 2, 3, 4, 5]


def test_compile_is_announced_before_the_progress_bar_and_timed(trained):
    _, workdir, _, stderr = trained
    lines = stderr.replace("\r", "\n").splitlines()
    announce = next(i for i, line in enumerate(lines) if line.startswith("compiling"))
    done = next(i for i, line in enumerate(lines) if line.startswith("compiled in"))
    bar = next(i for i, line in enumerate(lines) if "%|" in line)
    assert announce < done < bar, lines
    assert "ippo simple_spread_v3" in lines[announce] and "may take" in lines[announce], lines[announce]
    total_s = float(re.search(r"compiled in ([\d.]+) s", lines[done]).group(1))
    program_s = float(re.search(r"update program ([\d.]+) s", lines[done]).group(1))
    assert total_s >= program_s > 0, lines[done]
    record = read_metrics(os.path.join(workdir, "metrics.jsonl"))[-1]
    assert record["compile_s"] == pytest.approx(program_s, abs=0.05)


def test_eval_reports_every_seed_sampled_and_greedy(trained):
    run, workdir, _, _ = trained
    result = loop.evaluate(run, workdir)
    assert result["checkpoint_update"] == 5 and result["seeds"] == 2
    for mode in ("sampled", "greedy"):
        per_seed = np.asarray(result[f"{mode}_return_per_seed"])
        assert per_seed.shape == (2,) and np.all(np.isfinite(per_seed)), result
        assert per_seed[0] != per_seed[1], result  # seed 1 is evaluated with its own parameters
        assert result[f"{mode}_return_mean"] == pytest.approx(per_seed.mean())
        assert result[f"{mode}_return_std"] == pytest.approx(per_seed.std())
        assert len(result[f"{mode}_return_per_agent"]) == 3
    assert result["sampled_return_per_seed"] != result["greedy_return_per_seed"]
    saved = json.loads(open(os.path.join(workdir, "eval.json")).read())
    assert saved["greedy_return_mean"] == pytest.approx(result["greedy_return_mean"])
    assert os.path.getsize(os.path.join(workdir, "eval.gif")) > 1000


def test_config_path_resolves_against_the_repository(tmp_path):
    argv = ["train_marl.py", "--config=configs/marl.py:smoke", "--config.train.seed=3", "--workdir=w"]
    resolved = resolve_config_argv(argv, cwd=str(tmp_path))
    assert resolved[1] == f"--config={os.path.join(REPO_ROOT, 'configs', 'marl.py')}:smoke"
    assert resolved[2:] == argv[2:]
    # The separate-value form, and a path that exists from the working directory is left alone.
    assert resolve_config_argv(["x", "--config", "configs/marl.py"], cwd=str(tmp_path))[2] == os.path.join(
        REPO_ROOT, "configs", "marl.py"
    )
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "marl.py").write_text("")
    assert resolve_config_argv(argv, cwd=str(tmp_path)) == argv
    with pytest.raises(ConfigError, match=r"--config=nowhere.py:smoke: no such file 'nowhere.py' in "):
        resolve_config_argv(["x", "--config=nowhere.py:smoke"], cwd=str(tmp_path))


def test_train_marl_reads_the_repository_config_from_another_directory(tmp_path):
    """End to end from another working directory: the config file loads (then a misspelled override key
    stops the run before anything compiles, so the test stays fast)."""
    script = os.path.join(REPO_ROOT, "experiments", "train_marl.py")
    result = subprocess.run(
        [sys.executable, script, "--config=configs/marl.py:smoke", "--config.train.sed=1", "--workdir=w"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    # Before: "no such file 'configs/marl.py'"; now the file loads and the misspelled key is named.
    assert "train.sed" in result.stderr and "no such file" not in result.stderr, result.stderr
