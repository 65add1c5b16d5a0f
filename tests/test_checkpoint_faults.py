"""Checkpoints under faults, through the training loop in-process on a tiny model: a bad data position, a
corrupt newest step, SIGTERM during an async save, a full disk, resuming after a non-finite stop."""

import dataclasses
import math
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
from test_checkpoint import flip_one_bit

from jaxpar.config import CheckpointConfig, MeshConfig, ModelConfig, OptimizerConfig, RunConfig, TrainConfig
from jaxpar.parallel.mesh import make_mesh
from jaxpar.train import build as build_lib, loop
from jaxpar.train.checkpoint import Checkpointer, CheckpointError, CorruptCheckpointError
from run_testing import curve


def tiny_run(on_corrupt="stop", **train) -> RunConfig:
    """Compiles in seconds; a checkpoint is about 0.5 MB."""
    return RunConfig(
        model=ModelConfig(
            d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64
        ),
        mesh=MeshConfig(data=4, fsdp=2),
        optimizer=OptimizerConfig(warmup_steps=1),
        train=TrainConfig(
            **{
                "steps": 6,
                "global_batch": 8,
                "seq_len": 32,
                "log_every": 1,
                "eval_every": 0,
                "checkpoint_every": 2,
                **train,
            }
        ),
        checkpoint=CheckpointConfig(on_corrupt=on_corrupt),
    )


def restores_every_step(workdir, run) -> list[int]:
    """Every step in workdir/checkpoints restores, checksums verified; returns the steps."""
    abstract = build_lib.build(run, make_mesh(run.mesh.resolve(8))).abstract
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=100)
    steps = sorted(checkpointer.manager.all_steps())
    for step in steps:
        checkpointer.restore(step, abstract)
    checkpointer.close()
    return steps


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run of 6 steps stopped by a non-finite loss at step 5 (a bad batch: token ids beyond the
    vocabulary give NaN), with steps 2 and 4 saved. Tests copy it."""
    workdir = tmp_path_factory.mktemp("stopped")
    place, calls = loop.place_batch, []

    def bad_fifth_batch(batch, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            batch = {**batch, "inputs": np.full_like(batch["inputs"], 10**6)}
        return place(batch, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "place_batch", bad_fifth_batch)
        with pytest.raises(loop.NonFiniteError, match="at step 5"):
            loop.train(tiny_run(), str(workdir))
    return workdir


def copy_of(stopped, tmp_path):
    shutil.copytree(stopped, tmp_path / "run")
    return tmp_path / "run"


def test_resume_after_a_nonfinite_stop(stopped, tmp_path):
    workdir = copy_of(stopped, tmp_path)
    assert restores_every_step(workdir, tiny_run()) == [2, 4]
    loop.train(tiny_run(), str(workdir))
    losses = curve(workdir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # 5 logged again, by the resumed run
    assert all(math.isfinite(loss) for loss, *_ in losses.values())


@pytest.mark.parametrize("checksums", [True, False], ids=["checksummed", "older checkpoint"])
def test_data_position_with_wrong_keys_is_one_checkpoint_error(stopped, tmp_path, checksums):
    workdir = copy_of(stopped, tmp_path)
    position = workdir / "checkpoints" / "4" / "data" / "metadata"
    if not checksums:
        shutil.rmtree(workdir / "checkpoints" / "4" / "checksums")
    position.write_text('{"next_index": 3}')  # was a KeyError traceback from the data iterator
    with pytest.raises(CheckpointError) as caught:
        loop.train(tiny_run(), str(workdir))
    assert "checkpoint step 4" in str(caught.value) and str(position) in str(caught.value)
    assert (
        "does not match the checksum" in str(caught.value) if checksums else "KeyError" in str(caught.value)
    )


def test_corrupt_newest_step_stops_the_run_or_falls_back(stopped, tmp_path, caplog):
    workdir = copy_of(stopped, tmp_path)
    abstract = build_lib.build(tiny_run(), make_mesh(tiny_run().mesh.resolve(8))).abstract
    restore = lambda: Checkpointer(str(workdir / "checkpoints"), keep=3).restore(4, abstract)[0]
    flip_one_bit(workdir / "checkpoints" / "4", restore, restore())  # restored silently before checksums
    with pytest.raises(CorruptCheckpointError, match="checkpoint step 4 .* does not match the checksum"):
        loop.train(tiny_run(), str(workdir))
    loop.train(tiny_run(on_corrupt="fallback"), str(workdir))
    assert "checkpoint step 4 is corrupt; resuming from step 2" in caplog.text
    assert (workdir / "checkpoints" / "corrupt" / "4" / "state").is_dir()  # set aside, not deleted
    assert restores_every_step(workdir, tiny_run()) == [2, 4, 6]


def test_sigterm_during_an_async_save_saves_and_exits_cleanly(stopped, tmp_path, monkeypatch):
    workdir = copy_of(stopped, tmp_path)  # resumes from step 4 (saves the init's compile)
    save, in_flight = Checkpointer.save, []

    def save_then_sigterm(self, step, state, data_state):
        save(self, step, state, data_state)
        if not in_flight:
            in_flight.append(self.manager.is_saving_in_progress())
            os.kill(os.getpid(), signal.SIGTERM)  # lands while step 6 is being written

    monkeypatch.setattr(Checkpointer, "save", save_then_sigterm)
    last = loop.train(tiny_run(steps=100), str(workdir))
    assert in_flight == [True]
    assert last["preempted"] and last["step"] == 7
    assert restores_every_step(workdir, tiny_run(steps=100)) == [4, 6, 7]  # keeps the newest 3


def test_sigterm_while_the_last_save_commits_keeps_it(stopped, tmp_path, monkeypatch):
    """SIGTERM stays caught until the final async save has committed (it once killed the process there)."""
    workdir = copy_of(stopped, tmp_path)
    close = Checkpointer.close

    def sigterm_then_close(self):
        os.kill(os.getpid(), signal.SIGTERM)  # step 6, the last, is still being written
        close(self)

    monkeypatch.setattr(Checkpointer, "close", sigterm_then_close)
    last = loop.train(tiny_run(), str(workdir))
    monkeypatch.undo()
    assert last["step"] == 6 and "preempted" not in last
    assert restores_every_step(workdir, tiny_run()) == [2, 4, 6]


def test_disk_full_while_saving_fails_clearly_and_keeps_earlier_steps(stopped, tmp_path):
    """The checkpoint folder is a tmpfs holding step 2 of the stopped run with 128 KiB to spare: step 3
    (as large as step 2) does not fit, whatever this machine's file sizes are."""
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    checkpoints.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(checkpoints)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("needs permission to mount a tmpfs (root)")
    run = tiny_run(checkpoint_every=1, keep_checkpoints=100)
    try:
        shutil.copytree(stopped / "checkpoints" / "2", checkpoints / "2")
        disk = os.statvfs(checkpoints)
        used_kib = (disk.f_blocks - disk.f_bfree) * disk.f_frsize // 1024
        subprocess.run(["mount", "-o", f"remount,size={used_kib + 128}k", str(checkpoints)], check=True)
        with pytest.raises(CheckpointError) as caught:
            loop.train(run, str(workdir))
        message = str(caught.value)
        assert message.startswith(f"could not write checkpoint step 3 to {checkpoints}: the disk is full")
        assert "Earlier steps are intact (newest: 2)" in message and "\n" not in message
        assert restores_every_step(workdir, run) == [2]
        # With room again, the rerun resumes from step 2 over the partial write of step 3.
        subprocess.run(["mount", "-o", "remount,size=16m", str(checkpoints)], check=True)
        loop.train(dataclasses.replace(run, train=dataclasses.replace(run.train, steps=4)), str(workdir))
        assert restores_every_step(workdir, run) == [2, 3, 4]
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)
