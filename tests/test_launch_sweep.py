"""Sweep expansion (helpers, get_sweep in configs/lm.py, scripts/sweep.py) and collection of run folders,
including failed, stopped, unfinished and never-started runs. Fabricated run folders: no training here."""

import csv
import json
import os
import subprocess
import sys

import pytest

from jaxpar.launch import collect as collect_lib
from jaxpar.launch.job import LaunchError, apply_overrides, override_flags
from jaxpar.launch.sweep import chain, load_sweep, point_names, product, read_manifest, zip_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM_CONFIG = os.path.join(ROOT, "configs", "lm.py")


def script(name, *args, check=True):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_product_zip_chain():
    assert product({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]
    assert zip_({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    # a zip inside a product moves its keys together
    assert product({"s": [0, 1]}, zip_({"a": [1, 2], "b": [3, 4]})) == [
        {"s": 0, "a": 1, "b": 3},
        {"s": 0, "a": 2, "b": 4},
        {"s": 1, "a": 1, "b": 3},
        {"s": 1, "a": 2, "b": 4},
    ]
    assert chain(product({"a": [1]}), product({"b": [2]})) == [{"a": 1}, {"b": 2}]
    with pytest.raises(LaunchError, match="equal length"):
        zip_({"a": [1, 2], "b": [3]})
    with pytest.raises(LaunchError, match="set twice"):
        product({"a": [1]}, {"a": [2]})
    with pytest.raises(LaunchError, match="no values"):
        product({"a": []})


def test_point_names_are_readable_unique_and_safe():
    points = product({"optimizer.learning_rate": [1e-3, 3e-3]}, {"train.seed": [0, 1]})
    assert point_names(points)[:2] == ["learning_rate=0.001,seed=0", "learning_rate=0.001,seed=1"]
    # leaf names that collide fall back to the full dotted key
    assert point_names([{"model.d": 1, "train.d": 2}]) == ["model.d=1,train.d=2"]
    assert point_names([{"data.path": "/a b/*.txt"}]) == ["path=a-b-.txt"]
    assert point_names([{"a": 1}, {"a": 1}]) == ["a=1", "a=1,copy2"]


def test_overrides_format_back_to_flags_and_are_checked():
    assert override_flags(
        {
            "optimizer.learning_rate": 1e-3,
            "model.remat": "full",
            "model.tie_embeddings": True,
            "train.steps": 5,
        }
    ) == [
        "--config.optimizer.learning_rate=0.001",
        "--config.model.remat=full",
        "--config.model.tie_embeddings=True",
        "--config.train.steps=5",
    ]
    from configs import lm

    config = lm.get_config("smoke")
    assert apply_overrides(config, {"train.steps": 7}).train.steps == 7
    with pytest.raises(LaunchError, match="train.stepz"):
        apply_overrides(config, {"train.stepz": 7})
    with pytest.raises(LaunchError, match="train.steps"):
        apply_overrides(config, {"train.steps": "many"})


def test_lm_sweeps_expand_and_fit_the_config():
    from configs import lm
    from jaxpar.config import from_config_dict, validate_run

    config = lm.get_config("smoke")
    for name in ("lr", "lr_x_seed", "width", "tiny"):
        points = load_sweep(LM_CONFIG, name)
        assert points and len(set(point_names(points))) == len(points)
        for point in points:  # every point is a valid run on the smoke preset's 8 devices
            validate_run(from_config_dict(apply_overrides(config, point)), 8)
    assert len(load_sweep(LM_CONFIG, "lr_x_seed")) == 4
    with pytest.raises(LaunchError, match="unknown sweep"):
        load_sweep(LM_CONFIG, "nope")


def test_sweep_script_dry_run_writes_manifest(tmp_path):
    out = script(
        "sweep.py",
        f"--config={LM_CONFIG}:smoke",
        "--sweep=lr_x_seed",
        f"--workdir={tmp_path}",
        "--dry_run",
        "--config.train.steps=5",
    ).stdout
    manifest = read_manifest(str(tmp_path))
    assert manifest["sweep"] == "lr_x_seed" and manifest["common_overrides"] == {"train.steps": 5}
    names = [p["name"] for p in manifest["points"]]
    assert names == [
        "learning_rate=0.001,seed=0",
        "learning_rate=0.001,seed=1",
        "learning_rate=0.003,seed=0",
        "learning_rate=0.003,seed=1",
    ]
    assert manifest["points"][3]["overrides"] == {"optimizer.learning_rate": 0.003, "train.seed": 1}
    # the command each point would run: the experiment's own syntax
    assert (
        f"--workdir={tmp_path}/learning_rate=0.003,seed=1 --config.train.steps=5 "
        "--config.optimizer.learning_rate=0.003 --config.train.seed=1" in out
    )


def test_sweep_script_rejects_bad_input(tmp_path):
    result = script(
        "sweep.py",
        f"--config={LM_CONFIG}:smoke",
        "--sweep=lr",
        f"--workdir={tmp_path}",
        "--dry_run",
        "--config.optimizer.learning_rate=0.1",
        check=False,
    )
    assert result.returncode != 0 and "also given on the command line" in result.stderr
    result = script(
        "submit.py",
        f"--config={LM_CONFIG}:smoke",
        f"--workdir={tmp_path}",
        "--dry_run",
        "--config.train.stepz=3",
        check=False,
    )
    assert result.returncode != 0 and "stepz" in result.stderr  # config_flags names the unknown key


# --- collection ---------------------------------------------------------------------------------------


def fabricate(run_dir, steps, total, losses, status=None, throughput=1000.0, torn=False, config=True):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step, loss in zip(steps, losses):
            f.write(json.dumps({"step": step, "loss": loss, "tokens_per_sec": throughput}) + "\n")
        if torn:
            f.write('{"step": 99, "lo')  # killed mid-write
    if config:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"train": {"steps": total}}, f)
    if status:
        with open(os.path.join(run_dir, "status.json"), "w") as f:
            json.dump(status, f)


@pytest.fixture
def sweep_dir(tmp_path):
    runs = {
        "lr=0.001": dict(steps=[1, 5, 10], total=10, losses=[5.0, 3.0, 2.5], status={"state": "exited"}),
        "lr=0.003": dict(
            steps=[1, 5, 10],
            total=10,
            losses=[5.0, 2.0, 2.2],
            throughput=2000.0,
            status={"state": "exited", "exit_code": 0},
        ),
        "lr=0.01": dict(
            steps=[1, 5], total=10, losses=[5.0, 9.0], status={"state": "failed", "exit_code": 1}, torn=True
        ),
        "lr=0.03": dict(
            steps=[1, 5], total=10, losses=[5.0, 4.0], status={"state": "stopped", "exit_code": 0}
        ),
        "lr=0.1": dict(steps=[1, 5], total=10, losses=[5.0, 4.5]),  # no status: died without a word
    }
    points = []
    for name, spec in runs.items():
        fabricate(tmp_path / name, **spec)
        points.append(
            {
                "name": name,
                "workdir": str(tmp_path / name),
                "overrides": {"optimizer.learning_rate": float(name.split("=")[1])},
            }
        )
    points.append(
        {"name": "lr=0.3", "workdir": str(tmp_path / "lr=0.3"), "overrides": {"optimizer.learning_rate": 0.3}}
    )  # never started: no folder at all
    with open(tmp_path / "manifest.json", "w") as f:
        json.dump({"config": "configs/lm.py:smoke", "sweep": "lr", "points": points}, f)
    return tmp_path


def test_collect_keeps_failed_and_unfinished_runs(sweep_dir):
    runs, outputs = collect_lib.collect(str(sweep_dir))
    by_name = {r.name: r for r in runs}
    assert [r.name for r in runs] == ["lr=0.001", "lr=0.003", "lr=0.01", "lr=0.03", "lr=0.1", "lr=0.3"]
    assert {n: r.status for n, r in by_name.items()} == {
        "lr=0.001": "completed",
        "lr=0.003": "completed",
        "lr=0.01": "failed",
        "lr=0.03": "stopped",
        "lr=0.1": "unfinished",
        "lr=0.3": "not started",
    }
    assert by_name["lr=0.003"].final == 2.2 and by_name["lr=0.003"].best == 2.0
    assert by_name["lr=0.003"].throughput == 2000.0
    assert by_name["lr=0.01"].last_step == 5 and "exit 1" in by_name["lr=0.01"].detail  # torn line skipped
    assert by_name["lr=0.1"].detail == "at step 5/10"

    table = open(outputs["markdown"]).read()
    assert "6 runs: 2 completed, 1 failed, 1 stopped, 1 unfinished, 1 not started" in table
    assert "| lr=0.01 | **failed** | exit 1 at step 5/10 | 5 | loss | 9 | 5 |" in table
    with open(outputs["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == [
        "completed",
        "completed",
        "failed",
        "stopped",
        "unfinished",
        "not started",
    ]
    assert json.loads(rows[2]["overrides"]) == {"optimizer.learning_rate": 0.01}
    assert os.path.getsize(outputs["plot"]) > 10_000


def test_collect_script_without_manifest(sweep_dir):
    os.remove(sweep_dir / "manifest.json")  # falls back to the run folders it finds
    out = script("collect.py", str(sweep_dir)).stdout
    assert "5 runs: 2 completed, 1 failed, 1 stopped, 1 unfinished" in out
    assert (sweep_dir / "results.csv").exists() and (sweep_dir / "curves.png").exists()
    result = script("collect.py", str(sweep_dir / "lr=0.3"), check=False)
    assert result.returncode != 0 and "not a directory" in result.stderr
