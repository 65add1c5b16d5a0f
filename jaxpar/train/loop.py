"""The host loop: validate, build the sharded state (or resume it), step, log, evaluate, checkpoint.

Metrics of step s are fetched after step s+1 has been dispatched, so the device never waits for the
host; the fetch also checks every step's loss and gradient norm for non-finite values.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxpar.config import RunConfig, validate_run
from jaxpar.parallel import sequence as sequence_lib
from jaxpar.parallel.mesh import describe, make_mesh
from jaxpar.train import (
    build as build_lib,
    costs,
    data,
    metrics as metrics_lib,
    step as step_lib,
    workdir as workdir_lib,
)
from jaxpar.train.checkpoint import Checkpointer


class NonFiniteError(FloatingPointError):
    pass


class _Preemption:
    """SIGTERM (cluster preemption, time limit) asks the loop to checkpoint and exit at the next step.

    In a multi-process job every process must stop at the same step, because saving is collective and the
    signal reaches processes at different steps. There JAX's preemption sync manager (started by
    jax.distributed.initialize, which catches SIGTERM itself) agrees on the step; no Python handler.

    Single-process, the handler is installed only once the first step has been dispatched: until then
    (start-up, and the first step's compile, minutes for a large model, during which a Python handler
    could not run) SIGTERM keeps its default action and ends the process at once. Nothing is lost: no step
    has run that a checkpoint would keep."""

    def __init__(self):
        self.requested = False
        self.synced = False
        self.armed = False

    def __enter__(self):
        self.synced = jax.process_count() > 1
        return self

    def _arm(self):
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        self.armed = True

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        """Call exactly once per step, on every process."""
        if self.synced:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        elif not self.armed:
            self._arm()
        return self.requested

    def __exit__(self, *exc):
        if self.armed:
            signal.signal(signal.SIGTERM, self.previous)


def place_batch(
    batch: dict[str, np.ndarray], mesh, global_batch: int, zigzag: int = 1
) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, sharded over the batch axes. `zigzag` > 1 first
    permutes every row into the sequence-parallel zigzag layout (jaxpar.parallel.sequence)."""
    batch = sequence_lib.zigzag_batch(batch, zigzag)
    sharding = step_lib.batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(
            sharding, batch[key], (global_batch, *batch[key].shape[1:])
        )
        for key in step_lib.BATCH_KEYS
    }


def _check_finite(step: int, values: dict, checkpointer, first_step: int) -> None:
    """NonFiniteError saying what is known: the step, the values, the newest checkpoint, and the likely
    cause. The loss and gradients of `step` come from the parameters after the updates of the steps
    before it; at the first step of a run, or at lr 0 (warmup starts at 0, so no earlier update moved the
    parameters either), no learning rate can be to blame: the batch or the starting state is."""
    bad = [f"{k}={float(values[k])}" for k in ("loss", "grad_norm") if not math.isfinite(float(values[k]))]
    if not bad:
        return
    lr = float(values.get("lr", float("nan")))
    saved = checkpointer.latest_step()
    blame_input = (
        "the batch is bad (token ids >= model.vocab_size, wrong data.token_dtype) or that starting state "
        "is; not the learning rate."
    )
    if step == first_step:
        origin = f"as restored from checkpoint step {step - 1}" if step > 1 else "at their initial values"
        cause = f"No update had run yet, so the parameters were {origin}: {blame_input}"
    elif lr == 0.0:
        cause = f"The learning rate was 0 (warmup starts at 0), so no update moved the weights: {blame_input}"
    else:
        cause = (
            f"The learning rate was {lr:.3g}: lower optimizer.learning_rate or raise "
            "optimizer.warmup_steps (or optimizer.grad_clip_norm), or check the data if the loss had "
            "been falling smoothly."
        )
    if saved is None:
        kept = "No checkpoint has been saved yet (train.checkpoint_every), so a rerun starts from step 0."
    else:
        kept = (
            f"The newest saved state is checkpoint step {saved} in {checkpointer.directory}, from before "
            "this step; a rerun resumes from it."
        )
    raise NonFiniteError(f"non-finite {' and '.join(bad)} at step {step}; stopping. {cause} {kept}")


def make_evaluator(eval_step, run: RunConfig, mesh, zigzag: int):
    """evaluate(params) -> mean token loss over the first `eval_batches` batches of the held-out split
    (the same batches every time, so eval losses along a run are comparable). The pipeline is built
    once and rewound for each evaluation."""
    batches = data.make_batches(
        run.data,
        split="eval",
        seq_len=run.train.seq_len,
        batch_size=run.train.global_batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    first = batches.get_state()

    def evaluate(params) -> float:
        batches.set_state(first)
        loss_sum = count = 0.0
        for _ in range(run.train.eval_batches):
            s, c = eval_step(params, place_batch(next(batches), mesh, run.train.global_batch, zigzag))
            loss_sum, count = loss_sum + float(s), count + float(c)
        return loss_sum / max(count, 1.0)

    return evaluate


def train(run: RunConfig, workdir: str) -> dict:
    """Trains (or resumes) to `run.train.steps`; returns the last logged metrics. Holds the workdir's lock
    (jaxpar.train.workdir) throughout: a second run on the same workdir refuses to start."""
    with workdir_lib.exclusive(workdir, enabled=jax.process_index() == 0):
        return _train(run, workdir)


def _train(run: RunConfig, workdir: str) -> dict:
    mesh_sizes = validate_run(run, jax.device_count())
    tcfg = run.train
    batches = data.make_batches(  # fails here, before anything is traced, if the data is missing
        run.data,
        split="train",
        seq_len=tcfg.seq_len,
        batch_size=tcfg.global_batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    data.check_token_ids(run.data, run.model.vocab_size)  # an id past the vocabulary would be NaN at step 1
    data.record_tokenizer(run.data, workdir, write=jax.process_index() == 0)  # what generation decodes with
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(mesh_sizes)
    program = build_lib.build(run, mesh)
    program.check_fits()  # an absurd size is a ConfigError here, before anything is allocated or compiled
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints)
    # Verified against its checksums; the data position is applied inside the checkpoint error handling.
    restored = checkpointer.restore_latest(program.abstract, run.checkpoint.on_corrupt, batches.set_state)
    start, state = (0, program.init()) if restored is None else restored[:2]
    metrics_lib.save_config(run, workdir, mesh_sizes)

    # SIGTERM stays caught until the last async save has committed (checkpointer.close()).
    with jax.set_mesh(mesh), _Preemption() as preemption:
        try:
            return _run_steps(run, workdir, mesh, state, start, batches, program, checkpointer, preemption)
        finally:
            checkpointer.close()  # lets an in-flight async save commit, also when a step failed


def _run_steps(run, workdir, mesh, state, start, batches, program, checkpointer, preemption) -> dict:
    tcfg = run.train
    zigzag = run.model.zigzag_factor(dict(mesh.shape))
    evaluate = make_evaluator(program.eval_step, run, mesh, zigzag) if tcfg.eval_every else None
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
    tokens_per_step = tcfg.global_batch * tcfg.seq_len
    peak = costs.peak_flops_per_device(jax.devices()[0].device_kind)
    flops_per_step = costs.train_flops_per_token(run.model, tcfg.seq_len) * tokens_per_step
    bar = tqdm(
        total=tcfg.steps,
        initial=start,
        desc=f"train [{describe(mesh)}]",
        unit="step",
        disable=jax.process_index() != 0,
        mininterval=1.0,
    )
    log = bar.write if jax.process_index() == 0 else (lambda message: None)
    pending = None  # (step, device metrics) of the step before the one just dispatched
    window_start, window_steps = time.perf_counter(), 0
    last: dict = {}

    def finish(step_metrics) -> None:
        nonlocal window_start, window_steps, last
        step, values = step_metrics
        values = {
            k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
            for k, v in jax.device_get(values).items()
        }
        _check_finite(step, values, checkpointer, start + 1)
        window_steps += 1
        if step % tcfg.log_every and step not in (1, tcfg.steps):
            return
        elapsed = time.perf_counter() - window_start
        rate = window_steps / elapsed
        values.update(
            tokens_per_sec=rate * tokens_per_step,
            mfu=None if peak is None else rate * flops_per_step / (peak * jax.device_count()),
        )
        writer.write(step, values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_sec']:.0f}")
        eta = (tcfg.steps - step) / rate
        mfu = "n/a" if values["mfu"] is None else f"{values['mfu']:.1%}"
        log(
            f"step {step}/{tcfg.steps} | loss {values['loss']:.4f} | grad_norm {values['grad_norm']:.3f} | "
            f"lr {values['lr']:.2e} | {values['tokens_per_sec']:,.0f} tok/s | mfu {mfu} | ETA {eta:,.0f}s"
        )
        last = {"step": step, **values}
        window_start, window_steps = time.perf_counter(), 0

    with bar, contextlib.closing(writer):  # closed also when a step stops the run (NonFiniteError)
        for step in range(start + 1, tcfg.steps + 1):
            state, step_metrics = program.train_step(
                state, place_batch(next(batches), mesh, tcfg.global_batch, zigzag)
            )
            if pending is not None:
                finish(pending)
            pending = (step, step_metrics)
            bar.update(1)
            checkpoint_due = tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0
            preempted = preemption.reached(step)
            if checkpoint_due or step == tcfg.steps or preempted:
                finish(pending)  # never save a state whose step produced a non-finite loss
                pending = None
                checkpointer.save(step, state, batches.get_state())
            if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.steps):
                eval_loss = evaluate(state.params)
                writer.write(step, {"eval_loss": eval_loss})
                log(f"step {step}: eval loss {eval_loss:.4f}")
                last["eval_loss"] = eval_loss
            if preempted:
                bar.write(f"SIGTERM: saved checkpoint at step {step}; exiting so the job can be requeued.")
                last["preempted"] = True
                break
    if jax.process_index() == 0 and not last.get("preempted"):
        metrics_lib.plot_losses(workdir)
    return last
