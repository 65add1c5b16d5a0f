"""Faults while a run runs: bad token ids caught before compiling, what the non-finite stop says, SIGTERM
during start-up and during a long step, SIGKILL and resume of the MARL entry point. In process where the
fault allows; a subprocess per run only where a signal is the fault (scripts/fault_check.py repeats these
at random times, with more trials)."""

import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from configs import lm
from jaxpar.config import ConfigError, from_config_dict
from jaxpar.train import data, loop
from jaxpar.train.metrics import read_metrics
from run_testing import ENV, ROOT, wait_for_step

# A model small enough to compile in seconds on 8 CPU devices, on a flat uint16 token corpus.
TINY_MODEL = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def tiny_tokens_run(tmp_path, max_id: int, **train):
    for name in "ab":  # two files: two documents, one for each side of the train/eval split
        ids = np.random.default_rng(0).integers(0, 64, size=4000)
        ids[::7] = max_id  # in every batch
        ids.astype(np.uint16).tofile(tmp_path / f"corpus_{name}.bin")
    config = lm.get_config("smoke")
    config.model.update(TINY_MODEL)
    config.mesh.update(data=8, fsdp=1, tensor=1)
    config.data.update(source="tokens", path=str(tmp_path / "corpus_*.bin"), token_dtype="uint16")
    config.optimizer.update(warmup_steps=2)
    config.train.update(
        dict(steps=3, global_batch=8, seq_len=16, log_every=1, eval_every=0, checkpoint_every=0) | train
    )
    return from_config_dict(config)


def test_out_of_vocabulary_tokens_stop_the_run_before_it_compiles(tmp_path, monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("compiled a run whose token ids exceed the vocabulary")

    monkeypatch.setattr(loop.build_lib, "build", build)
    with pytest.raises(ConfigError, match=r"corpus_a\.bin.*\b100\b.*model\.vocab_size=64"):
        loop.train(tiny_tokens_run(tmp_path, max_id=100), str(tmp_path / "run"))


def test_nonfinite_at_the_first_step_blames_the_data_not_the_learning_rate(tmp_path, monkeypatch):
    """Step 1 runs at lr 0 (warmup) from fresh parameters, with no checkpoint yet: the message must not
    advise lowering the learning rate nor promise a checkpoint."""
    monkeypatch.setattr(data, "check_token_ids", lambda *args, **kwargs: None, raising=False)  # let it run
    with pytest.raises(loop.NonFiniteError) as error:
        loop.train(tiny_tokens_run(tmp_path, max_id=100), str(tmp_path / "run"))
    message = str(error.value)
    assert "at step 1" in message and "loss" in message, message
    assert "no checkpoint" in message.lower() and "data" in message, message
    assert "learning_rate" not in message and "checkpoint is kept" not in message, message


def test_nonfinite_message_names_the_checkpoint_and_the_learning_rate():
    checkpointer = types.SimpleNamespace(latest_step=lambda: 20, directory="/runs/a/checkpoints")
    values = {"loss": float("nan"), "grad_norm": float("inf"), "lr": 3e-3}
    with pytest.raises(loop.NonFiniteError) as error:
        loop._check_finite(23, values, checkpointer, first_step=1)
    message = str(error.value)
    assert "loss=nan" in message and "grad_norm=inf" in message and "step 23" in message, message
    assert "checkpoint step 20" in message and "learning_rate" in message, message
    # The first step after a restore: the restored state or the data, not the learning rate.
    with pytest.raises(loop.NonFiniteError) as error:
        loop._check_finite(21, {**values, "grad_norm": 1.0}, checkpointer, first_step=21)
    message = str(error.value)
    assert "grad_norm" not in message and "restored" in message and "learning_rate" not in message, message
    loop._check_finite(5, {"loss": 1.0, "grad_norm": 2.0, "lr": 0.0}, checkpointer, first_step=1)


# --- signals: one training process each ------------------------------------------------------------


def lm_command(workdir, *overrides):
    return [
        sys.executable,
        os.path.join(ROOT, "experiments", "train_lm.py"),
        f"--config={os.path.join(ROOT, 'configs', 'lm.py')}:smoke",
        f"--workdir={workdir}",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.checkpoint_every=0",
        "--config.train.steps=1000",
        *overrides,
    ]


def saved_steps(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def test_sigterm_during_start_up_exits_promptly(tmp_path):
    """SIGTERM while the first step compiles: nothing has been
    computed that a checkpoint would keep, so the process ends at once instead of compiling, stepping and
    saving first (minutes for a large model, past a scheduler's grace period)."""
    process = subprocess.Popen(
        lm_command(tmp_path), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    stderr = b""
    while b"train [" not in stderr:  # the progress bar: drawn just before the first step is compiled
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, f"the run ended before its first step: {stderr[-2000:]}"
        stderr += chunk
    process.send_signal(signal.SIGTERM)
    sent = time.time()
    stderr += process.communicate(timeout=120)[1]
    assert process.returncode == -signal.SIGTERM, stderr[-2000:].decode(errors="replace")
    assert time.time() - sent < 5.0
    metrics = tmp_path / "metrics.jsonl"
    assert saved_steps(tmp_path) == [] and (not metrics.exists() or not metrics.read_text())


def test_sigterm_during_a_long_step_saves_within_two_steps(tmp_path):
    """A step of a few seconds (a large batch): the signal lands while the host waits on the device; the
    run saves at the step in flight or the one queued behind it and exits 0, without running on."""
    batch = ["--config.train.global_batch=64", "--config.train.seq_len=256"]
    process = subprocess.Popen(
        lm_command(tmp_path, *batch), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_step(tmp_path, 1, process)  # step 2 is running, step 1's metrics are written
    logged = max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl"))
    process.send_signal(signal.SIGTERM)
    sent = time.time()
    stdout, stderr = process.communicate(timeout=300)
    waited = time.time() - sent
    assert process.returncode == 0, stderr[-2000:]
    records = read_metrics(tmp_path / "metrics.jsonl")
    step_s = max(64 * 256 / r["tokens_per_sec"] for r in records if r["step"] >= 2)  # 1 holds the compile
    saved = saved_steps(tmp_path)
    assert len(saved) == 1 and logged < saved[0] <= logged + 2, (logged, saved)
    assert f"SIGTERM: saved checkpoint at step {saved[0]}" in stdout + stderr
    assert waited < 3 * step_s + 30, (waited, step_s)  # two steps, the save, the shutdown


def test_marl_resume_after_sigkill_is_bitwise(tmp_path):
    """experiments/train_marl.py killed between checkpoints, then rerun: every update the killed run
    logged past its last checkpoint is recomputed with identical floats, and the run completes."""
    command = [
        sys.executable,
        os.path.join(ROOT, "experiments", "train_marl.py"),
        f"--config={os.path.join(ROOT, 'configs', 'marl.py')}:smoke",
        f"--workdir={tmp_path}",
        f"--config.train.total_env_steps={64 * 25 * 40}",
        "--config.train.updates_per_call=1",
        "--config.train.checkpoint_every=10",
    ]
    # The rerun loads the killed run's compiled program from this cache: the same program, 10 s sooner.
    env = {**ENV, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "metrics.jsonl"
    wait_for_step(tmp_path, 1, process)

    # Kill once a checkpoint has committed and the run has logged updates past it (which the rerun must
    # recompute), well before the next checkpoint.
    def killable() -> bool:
        saved, last = saved_steps(tmp_path), read_metrics(metrics)[-1]["step"]
        return bool(saved) and saved[-1] < last < 35 and last % 10 != 0  # no save of `last` in flight

    while not killable():
        assert process.poll() is None, "the run finished before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed = read_metrics(metrics)
    resumed_from = saved_steps(tmp_path)[-1]
    assert killed[-1]["step"] > resumed_from, (killed[-1]["step"], resumed_from)

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"took over the stale lock {tmp_path / '.lock'} of pid {process.pid}" in rerun.stderr
    final = {r["step"]: r for r in read_metrics(metrics)}
    assert sorted(final) == list(range(1, 41))
    timing = ("env_steps_per_s", "wall_s", "compile_s", "cpu_s")
    strip = lambda record: {k: v for k, v in record.items() if k not in timing}
    for record in killed:
        assert strip(record) == strip(final[record["step"]]), record["step"]
