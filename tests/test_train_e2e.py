"""The training job end to end, as a user runs it: a subprocess per run of experiments/train_lm.py."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxpar.config import MeshConfig, from_config_dict
from jaxpar.train import build as build_lib, optimizer as optimizer_lib
from jaxpar.train.checkpoint import Checkpointer
from jaxpar.train.metrics import read_metrics
from lm_testing import config_mesh
from run_testing import ENV, ROOT, curve, wait_for_step

# Short runs of the smoke model, logging every step and saving only the last one (a checkpoint costs about as
# much as a dozen steps of this model).
QUICK = ["--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.checkpoint_every=0"]


def command(workdir, *overrides, preset="smoke"):
    return [
        sys.executable,
        os.path.join(ROOT, "experiments", "train_lm.py"),
        f"--config={os.path.join(ROOT, 'configs', 'lm.py')}:{preset}",
        f"--workdir={workdir}",
        *overrides,
    ]


def train(workdir, *overrides, check=True):
    result = subprocess.run(
        command(workdir, *overrides), env=ENV, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_smoke_preset_trains(tmp_path):
    result = train(tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 2.0, losses
    final = [r for r in records if "eval_loss" in r][-1]
    assert final["eval_loss"] < losses[0] - 2.0
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(records[0])
    for name in ("loss.png", "config.json"):
        assert (tmp_path / name).exists(), name
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
    assert json.loads((tmp_path / "config.json").read_text())["resolved_mesh"]["tensor"] == 2
    assert "step 150/150 | loss" in result.stdout + result.stderr  # the periodic log line


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # SOAP restores in tests/test_optimizers.py
def test_resume_after_sigkill_is_bitwise(tmp_path, optimizer):
    steps = ["--config.train.steps=12", f"--config.optimizer.name={optimizer}", *QUICK[:2]]
    steps.append("--config.train.checkpoint_every=6")
    train(tmp_path / "straight", *steps)
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        command(killed, *steps), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_step(killed, 9, process)  # between the checkpoints at 6 and 12
    process.send_signal(signal.SIGKILL)
    process.wait()
    train(killed, *steps)
    want, got = curve(tmp_path / "straight"), curve(killed)
    assert sorted(got) == list(range(1, 13))
    assert got == want  # bitwise: same floats for every step


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    process = subprocess.Popen(
        command(tmp_path, "--config.train.steps=1000", *QUICK),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(tmp_path, 3, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGTERM: saved checkpoint at step" in stdout + stderr
    saved = Checkpointer(str(tmp_path / "checkpoints"), keep=3).latest_step()
    assert saved is not None and saved >= 3
    train(tmp_path, f"--config.train.steps={saved + 2}", *QUICK)
    assert max(curve(tmp_path)) == saved + 2


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    """Universal checkpointing: saved under fsdp=8, restored under data=2 x tensor=4 with equal values,
    then training continues on the new mesh."""
    model = ["--config.model.n_kv_heads=4"]
    train(
        tmp_path,
        "--config.train.steps=10",
        *QUICK,
        *model,
        "--config.mesh.data=1",
        "--config.mesh.fsdp=8",
        "--config.mesh.tensor=1",
    )

    from configs import lm

    config = lm.get_config("smoke").to_dict()
    config["model"]["n_kv_heads"] = 4
    run = from_config_dict(config)
    tx = optimizer_lib.make_optimizer(run.optimizer, 10)
    restored = {}
    for name, mesh_config in {
        "fsdp8": MeshConfig(data=1, fsdp=8),
        "dp2_tp4": MeshConfig(data=2, tensor=4),
    }.items():
        _, abstract, _ = build_lib.abstract_state(run.model, tx, config_mesh(mesh_config))
        restored[name], _ = Checkpointer(str(tmp_path / "checkpoints"), keep=3).restore(10, abstract)
    w_up = restored["dp2_tp4"].params["blocks"]["mlp"]["w_up"][...]
    assert w_up.sharding.shard_shape(w_up.shape) == (2, 128, 384 // 4)
    for a, b in zip(jax.tree.leaves(restored["fsdp8"]), jax.tree.leaves(restored["dp2_tp4"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    train(
        tmp_path,
        "--config.train.steps=16",
        *QUICK,
        *model,
        "--config.mesh.data=2",
        "--config.mesh.fsdp=1",
        "--config.mesh.tensor=4",
    )
    losses = curve(tmp_path)
    assert sorted(losses) == list(range(1, 17))
    assert losses[16][0] < losses[10][0] + 0.1  # continues from the restored state, not from scratch
    assert losses[11][0] < losses[1][0] - 1.0


def test_corrupt_checkpoint_fails_clearly_and_deletes_nothing(tmp_path):
    train(tmp_path, "--config.train.steps=5", *QUICK)
    state_dir = tmp_path / "checkpoints" / "5" / "state"
    victim = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(b"not a checkpoint")
    before = sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())
    result = train(tmp_path, "--config.train.steps=8", *QUICK, check=False)
    assert result.returncode != 0
    assert "checkpoint step 5" in result.stderr and "could not be restored" in result.stderr
    after = sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())
    log = str(tmp_path / "checkpoints" / "restore_error.log")  # the full error, the only new file
    assert [entry for entry in after if entry[0] != log] == before


def test_nonfinite_loss_stops_with_the_step(tmp_path):
    result = train(
        tmp_path,
        "--config.train.steps=10",
        *QUICK[:2],
        "--config.train.checkpoint_every=1",
        "--config.optimizer.learning_rate=1e30",
        "--config.optimizer.warmup_steps=1",
        check=False,
    )
    assert result.returncode != 0
    assert "non-finite" in result.stderr and "at step 3" in result.stderr
    assert Checkpointer(str(tmp_path / "checkpoints"), keep=3).latest_step() == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.mesh.data=3"], "uses 12 devices but 8 are present"),
        (["--config.train.global_batch=6"], "train.global_batch=6"),
        (["--config.data.source=text", "--config.data.path=/nonexistent/*.txt"], "/nonexistent/*.txt"),
        (["--config.model.n_layerz=3"], "n_layerz"),
    ],
)
def test_bad_input_fails_before_compiling(tmp_path, overrides, message):
    result = train(tmp_path, *overrides, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr or "n_layerz" in message
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_moe_smoke_trains_with_balanced_load(tmp_path):
    result = subprocess.run(
        command(tmp_path, "--config.train.steps=60", "--config.train.eval_every=0", preset="moe_smoke"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"] - 2.0
    assert len(records[-1]["moe_tokens_per_expert"]) == 8
    # No router collapse: every expert gets tokens and none takes more than 3x its share (a router that
    # sent every token's two choices to two experts would show 4x); the aux loss stays near 1 (uniform).
    assert min(records[-1]["moe_tokens_per_expert"]) > 0
    assert records[-1]["moe_max_load_over_mean"] < 3.0
    assert records[-1]["moe_aux_loss"] < 1.3
    assert records[-1]["moe_dropped_fraction"] == 0.0  # dropless


def test_pipelined_training_runs_from_the_command_line(tmp_path):
    """mesh.pipeline=2 x data=4 with the 1F1B schedule, through the same entry point and loop."""
    train(
        tmp_path,
        "--config.train.steps=12",
        *QUICK,
        "--config.mesh.pipeline=2",
        "--config.mesh.data=4",
        "--config.mesh.fsdp=1",
        "--config.mesh.tensor=1",
        "--config.pipeline.microbatches=4",
    )
    losses = curve(tmp_path)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12][0] < losses[1][0] - 1.0


@pytest.mark.parametrize(
    "overrides",
    [
        ("--config.model.sequence_parallel=ring",),
        (
            "--config.model.sequence_parallel=usp",
            "--config.model.mixer=hybrid",
            "--config.model.softmax_every=2",
        ),
    ],
)
def test_sequence_parallel_run_matches_data_parallel(tmp_path, overrides):
    """The long_smoke preset (each sequence split four ways; the loop lays the batch out zigzag for the
    ring) logs the same losses as the same model with the sequence whole on each device."""
    quick = [
        "--config.train.steps=4",
        "--config.train.seq_len=256",
        "--config.train.global_batch=8",
        *QUICK,
        *overrides,
    ]
    for name, mesh in [("split", ()), ("whole", ("--config.mesh.data=8", "--config.mesh.sequence=1"))]:
        result = subprocess.run(
            command(tmp_path / name, *quick, *mesh, preset="long_smoke"),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    split, whole = curve(tmp_path / "split"), curve(tmp_path / "whole")
    assert sorted(split) == [1, 2, 3, 4]
    # Same math in another order: measured max relative difference 1.7e-7 (loss, grad_norm).
    np.testing.assert_allclose(
        [split[s] for s in sorted(split)], [whole[s] for s in sorted(whole)], rtol=2e-6
    )
