"""Will this run fit? A per-device memory model of one training step, from abstract shapes only (nothing
allocated, nothing compiled), and the check that refuses a run its devices cannot hold.

The model (what `estimate` returns, bytes per device):

- params, opt_state: exact, from the abstract TrainState's shardings (the rules table, ZeRO-3 under
  FSDP; any optimizer of jaxpar.train.optimizers, whatever its state's shapes).
- grads: the parameters' bytes (gradients are pinned to the parameters' layout).
- activations: what the backward pass reads, traced rather than guessed: the residuals of
  `jax.vjp(loss)` under `jax.eval_shape`, inside an abstract mesh of the run's axis sizes so the
  sequence-parallel and expert-parallel paths are the ones traced; model.remat's policy decides what
  they are. Weights are left out (the parameters already hold them). Per device: the global residuals
  over the devices that split the batch, the sequence, heads and hidden units (all but "pipeline");
  with pipeline stages, one stage's layers times the schedule's peak stashed microbatches.
- transient: the working set of the backward of one layer (its full, un-rematerialised residuals: the
  recomputation under remat, the gradients of those values under any policy; calibrated factors below),
  plus the FSDP-gathered weights of one layer.
- batch: the int32 token arrays of the step.
- update: with config.offload, what the update phase needs beyond the backward's peak (the moments and/or
  parameters and gradients copied in from the host, and the new values going out).
- host (not in the total): what config.offload and model.remat 'offload' / 'offload_names' keep in pinned
  host memory;
  host_traffic: the bytes config.offload moves between host and device per step.

`check_fits` compares the total with the device's memory; the loop calls it after building the program
and before creating the state. Refusals raise `DoesNotFit` (a ConfigError carrying the estimate), which
the entry point (experiments/train_lm.py) completes with the planner's best fitting alternative
(jaxpar.plan). The check belongs to running, not to compiling: `TrainProgram.compile` still lowers any
size for any mesh. benchmarks/memory/ measures this model against XLA's buffer assignment.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from jaxpar.config import ConfigError, RunConfig, TrainConfig, batch_split
from jaxpar.parallel.analysis import bytes_per_device, state_bytes_per_device
from jaxpar.parallel.mesh import MESH_AXES
from jaxpar.train import costs, offload

GiB = 2**30

# The backward's working set in units of one layer's un-rematerialised residuals, as XLA's buffer
# assignment shows it on CPU (benchmarks/memory/): (without, with) remat 'full', which recomputes the
# whole layer; without it the backward reads saved values and holds about 3/4 of a layer's worth.
# The lockstep pipeline executor evaluates a stage's whole backward inside one tick (per layer of the
# stage; under remat 'full' one layer's recomputation at a time), and its stash buffer costs about 1.1
# slots' worth per slot.
WORKING = (0.75, 1.0)
PIPELINE_WORKING = (5.0, 1.75)
PIPELINE_STASH = 1.1
PARTS = ("params", "opt_state", "grads", "activations", "transient", "batch", "update")


class DoesNotFit(ConfigError):
    """The run's estimate exceeds its devices' memory: `need` (the estimate) and `bytes_limit`."""

    def __init__(self, message: str, need: Mapping[str, int], bytes_limit: int):
        super().__init__(message)
        self.need, self.bytes_limit = dict(need), bytes_limit


def device_memory(device: jax.Device) -> tuple[int | None, str]:
    """(bytes one device may use, where that number comes from); None when unknown. Accelerators report
    their limit; CPU devices share the host's physical memory equally among this process's devices."""
    try:
        stats = device.memory_stats() or {}
    except (AttributeError, NotImplementedError, RuntimeError):  # not every backend reports it
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"the {device.device_kind} memory limit"
    if device.platform == "cpu":
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        count = jax.local_device_count()
        return host // count, f"{host / GiB:.1f} GiB of host memory shared by {count} CPU devices"
    return None, "unknown"


def abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
    """An abstract mesh (no devices) of these axis sizes: shardings and traced programs for any device
    count, e.g. 64 devices planned on a laptop."""
    shape = tuple(sizes.get(name, 1) for name in MESH_AXES)
    return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _leaf_bytes(leaves) -> int:
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves)


@functools.lru_cache(maxsize=256)
def _residual_bytes(model, rows: int, seq_len: int, sizes: tuple[tuple[str, int], ...]) -> int:
    """Global bytes of the residuals `jax.vjp` keeps of the loss of `rows` x `seq_len` tokens, weights
    excluded, traced under an abstract mesh of `sizes` (pipeline left out: a stage runs the plain
    blocks)."""
    from jaxpar.train import build, step  # build imports this module

    graphdef, params = build.abstract_model(model)
    batch = {key: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32) for key in step.BATCH_KEYS}

    def residuals(p, b):
        return jax.vjp(lambda p: step.loss_sums(p, graphdef, b)[0], p)[1]

    with jax.sharding.use_abstract_mesh(abstract_mesh(dict(sizes))):
        saved = jax.tree.leaves(jax.eval_shape(residuals, params, batch))
    # The weights the backward reads are parameters: held already, so left out (matched by shape).
    weights: dict[tuple, int] = {}
    for leaf in jax.tree.leaves(params):
        weights[(leaf.shape, leaf.dtype)] = weights.get((leaf.shape, leaf.dtype), 0) + 1
    kept = []
    for leaf in saved:
        key = (leaf.shape, leaf.dtype)
        if weights.get(key, 0):
            weights[key] -= 1
        else:
            kept.append(leaf)
    return _leaf_bytes(kept)


def _layer_unit(model) -> int:
    """The fewest layers a model of this config can have (a hybrid repeats groups of softmax_every)."""
    return model.softmax_every if model.mixer == "hybrid" else 1


@dataclasses.dataclass(frozen=True)
class Residuals:
    """Per-device residual bytes of one (micro)batch: `per_layer` of one layer, `edges` of the embedding,
    final norm and logits; `layer_full` of one layer without remat (the backward's working set)."""

    per_layer: int
    edges: int
    layer_full: int


def residuals(run: RunConfig, sizes: Mapping[str, int], rows: int, remat: str | None = None) -> Residuals:
    """Residuals per device of a microbatch of `rows` global rows, by tracing models of one and two layer
    units (residuals grow linearly with depth: the layers are one scan)."""
    model = run.model if remat is None else dataclasses.replace(run.model, remat=remat)
    inner = {**sizes, "pipeline": 1}
    splits = math.prod(inner.values())
    # Residuals are linear in the rows: trace few rows and scale. Without sequence or
    # expert parallelism the traced program does not depend on the mesh (constraints keep shapes), so
    # one trace of one row on a 1-device mesh serves every mesh.
    # With them, only the sequence, tensor (heads per device) and expert axes shape it: trace one row
    # per expert shard on a mesh without data and fsdp.
    if sizes["sequence"] == 1 and sizes["expert"] == 1:
        traced_rows, key = 1, ()
    else:
        traced_sizes = {**inner, "data": 1, "fsdp": 1}
        traced_rows, key = sizes["expert"], tuple(sorted(traced_sizes.items()))
    scale = rows / traced_rows / splits  # residuals are global arrays: every device holds a 1/splits
    unit = _layer_unit(model)

    def traced(m, layers):  # per device: the traced mesh's devices split the traced rows' residuals
        m = dataclasses.replace(m, n_layers=layers)
        return _residual_bytes(m, traced_rows, run.train.seq_len, key) * scale

    one, two = traced(model, unit), traced(model, 2 * unit)
    plain = dataclasses.replace(model, remat="none")
    full_one, full_two = traced(plain, unit), traced(plain, 2 * unit)
    return Residuals(
        per_layer=int((two - one) / unit),
        edges=int(max(2 * one - two, 0)),
        layer_full=int((full_two - full_one) / unit),
    )


def _layer_weight_bytes(run: RunConfig, sizes: Mapping[str, int]) -> int:
    """One layer's weights as the FSDP gather materialises them (split over tensor and expert only)."""
    m = run.model
    attn = m.d_model * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
    mlp = 3 * m.d_model * m.d_ff
    if m.moe.experts:
        mlp = 3 * m.d_model * m.moe.d_ff * (m.moe.experts // sizes["expert"] + m.moe.shared_experts)
    return (attn + mlp) * np.dtype(m.param_dtype).itemsize // sizes["tensor"]


def microbatching(run: RunConfig, sizes: Mapping[str, int]) -> tuple[int, int]:
    """(rows of one microbatch, microbatches whose residuals are alive at once)."""
    train = run.train
    if sizes["pipeline"] > 1:
        return train.global_batch // run.pipeline.microbatches, _peak_stashes(run.pipeline, sizes["pipeline"])
    return train.global_batch // train.grad_accum_steps, 1


@functools.lru_cache(maxsize=512)
def _peak_stashes(pipeline_cfg, stages: int) -> int:
    """The stash slots of the pipeline executor: the schedule's peak of microbatches in flight."""
    return max(pipeline_cfg.make_schedule(stages).peak_in_flight())


# remat policies that keep another policy's residuals in host memory instead of the device's
OFFLOADED_REMAT = {"offload": "save_dots", "offload_names": "save_names"}


def estimate(run: RunConfig, sizes: Mapping[str, int], abstract=None) -> dict[str, int]:
    """Bytes per device of one train step of `run` on a mesh of these axis sizes: PARTS, `total` (their
    sum) and `host` (bytes kept in pinned host memory by offloading, not in the total). `abstract`: the
    program's abstract TrainState (with shardings); made on an abstract mesh when not given."""
    sizes = {name: sizes.get(name, 1) for name in MESH_AXES}
    if abstract is None:
        abstract = abstract_train_state(run, sizes)
    state = state_bytes_per_device(abstract)
    rows, alive = microbatching(run, sizes)
    remat = run.model.remat
    # remat 'offload' ('offload_names') keeps save_dots' (save_names') residuals in host memory: the
    # device holds what 'full' keeps (the layer inputs), the host the rest; the backward streams one
    # layer's back in.
    kept_on_host = OFFLOADED_REMAT.get(remat)
    recomputes = costs.remat_family(remat) == "full"  # the backward recomputes a layer at a time
    res = residuals(run, sizes, rows, "full" if kept_on_host else None)
    stages = sizes["pipeline"]
    layers_here = run.model.n_layers // stages
    stashed = PIPELINE_STASH * alive if stages > 1 else 1
    host = traffic = 0  # bytes kept in host memory; bytes crossing between host and device per step
    offloaded_layer = 0
    if kept_on_host:
        offloaded_layer = residuals(run, sizes, rows, kept_on_host).per_layer - res.per_layer
        host += int(stashed * layers_here * offloaded_layer)
        traffic += 2 * int(
            stashed * layers_here * offloaded_layer
        )  # out in the forward, back in the backward
    if stages > 1:  # every stage holds 1/P of the vocabulary head; stashes hold the blocks' residuals
        activations = stashed * layers_here * res.per_layer + res.edges // stages
        # a tick evaluates a stage's whole backward; under remat 'full' it recomputes layer by layer
        working = PIPELINE_WORKING[recomputes] * (1 if recomputes else layers_here)
    else:
        activations = layers_here * res.per_layer + res.edges
        working = WORKING[recomputes]
    ring = run.model.sequence_parallel in ("ring", "usp") and run.model.mixer != "linear"
    if sizes["sequence"] > 1 and ring:
        working *= sizes["sequence"]  # the unrolled ring keeps every step's blocks for its backward
    transient = working * res.layer_full + offloaded_layer
    if sizes["fsdp"] > 1:
        transient += _layer_weight_bytes(run, sizes)
    batch_shards, _ = batch_split(sizes)
    batch = 4 * 4 * run.train.global_batch * run.train.seq_len // batch_shards
    parts = {
        "params": state["params"],
        "opt_state": state["opt_state"],
        "grads": state["params"],
        "activations": int(activations),
        "transient": int(transient),
        "batch": batch,
        "update": 0,
    }
    if run.offload.optimizer_state:
        # The moments live on the host; the update copies them in (and its result out) after the
        # backward has freed the activations, so the step's peak is the larger of the two phases.
        moments, parts["opt_state"] = parts["opt_state"], 0
        host += moments
        traffic += 2 * moments  # in for the update, out with its result
        update_phase = parts["params"] + parts["grads"] + 2 * moments + batch
        parts["update"] = max(update_phase - sum(parts.values()), 0)
    if run.offload.params:
        # Parameters and their gradients live on the host; the layer scan holds one layer's shard of each
        # on the device at a time (the gradients stream out as the backward makes them), the unscanned
        # leaves stay on the device for the step, and the update brings both in whole.
        scanned = offload.scanned_leaves(abstract.params)
        unscanned = bytes_per_device(jax.tree.map(lambda a, s: None if s else a, abstract.params, scanned))
        layer = (parts["params"] - unscanned) // max(layers_here, 1)
        whole = parts["params"]
        host += whole
        # fetched by the forward and again by the rematerialised backward, gradients out, parameters and
        # gradients in for the update, parameters out
        traffic += 6 * whole
        parts["params"] = parts["grads"] = unscanned + layer
        update_phase = 2 * whole + parts["opt_state"] + (2 * moments if run.offload.optimizer_state else 0)
        parts["update"] = max(update_phase + batch - sum(parts.values()), 0)
    return {**parts, "total": sum(parts.values()), "host": host, "host_traffic": traffic}


def abstract_train_state(run: RunConfig, sizes: Mapping[str, int]):
    """The abstract TrainState of `run` with its shardings on an abstract mesh of these axis sizes."""
    # Only the axes that split parameters (rules.RULES) decide the state's shards.
    relevant = {name: sizes.get(name, 1) for name in ("pipeline", "fsdp", "expert", "tensor")}
    model = dataclasses.replace(run.model, remat="none")  # the state does not depend on it
    return _abstract_state(model, run.optimizer, run.train.steps, tuple(sorted(relevant.items())))


@functools.lru_cache(maxsize=128)
def _abstract_state(model, optimizer_cfg, steps: int, sizes: tuple[tuple[str, int], ...]):
    from jaxpar.train import build, optimizer  # build imports this module

    tx = optimizer.for_run(RunConfig(model=model, optimizer=optimizer_cfg, train=TrainConfig(steps=steps)))
    return build.abstract_state(model, tx, abstract_mesh(dict(sizes)))[1]


def limit_bytes(run: RunConfig, mesh_device: jax.Device | None, bytes_limit: int | None = None):
    """(bytes per device, where that number comes from): `bytes_limit` when given, else
    train.device_memory_gb when set, else what the device reports (`device_memory`)."""
    if bytes_limit is not None:
        return bytes_limit, "as given"
    configured = getattr(run.train, "device_memory_gb", 0.0)
    if configured:
        return int(configured * GiB), f"train.device_memory_gb={configured}"
    if mesh_device is None:
        return None, "unknown"
    return device_memory(mesh_device)


def describe(need: Mapping[str, int]) -> str:
    """'params 1.00 + opt_state 2.00 + ... GiB'."""
    return " + ".join(f"{name} {need[name] / GiB:.2f}" for name in PARTS) + " GiB"


def check_fits(run: RunConfig, mesh: jax.sharding.Mesh, abstract, bytes_limit: int | None = None) -> dict:
    """Raises DoesNotFit (a ConfigError) when the estimate exceeds the memory of the mesh's devices
    (`bytes_limit` per device, else train.device_memory_gb, else what `device_memory` finds); returns
    the estimate."""
    sizes = dict(mesh.shape)
    need = estimate(run, sizes, abstract)
    bytes_limit, source = limit_bytes(run, mesh.devices.flat[0], bytes_limit)
    if bytes_limit is None or need["total"] <= bytes_limit:
        return need
    state = need["params"] + need["opt_state"] + need["grads"]
    acts = need["activations"] + need["transient"]
    model, train = run.model, run.train
    fixes = []
    if state > bytes_limit or state >= acts:
        fixes.append(
            f"the model's state alone needs {state / GiB:.2f} GiB: shrink the model (model.n_layers="
            f"{model.n_layers}, model.d_model={model.d_model}, model.d_ff={model.d_ff}, model.vocab_size="
            f"{model.vocab_size}) or shard it over more devices (mesh.fsdp={sizes['fsdp']}, mesh.tensor="
            f"{sizes['tensor']}, mesh.pipeline={sizes['pipeline']})"
        )
    if acts > bytes_limit or acts > state:
        fixes.append(
            f"the activations alone need {acts / GiB:.2f} GiB: shrink train.global_batch="
            f"{train.global_batch} or train.seq_len={train.seq_len}, raise train.grad_accum_steps="
            f"{train.grad_accum_steps}"
            + (
                f", set model.remat='full' or 'offload' (now {model.remat!r})"
                if model.remat != "full"
                else ""
            )
            + " or split the batch over more devices"
        )
    raise DoesNotFit(
        f"this run needs about {need['total'] / GiB:.2f} GiB per device ({describe(need)}) but a device "
        f"has {bytes_limit / GiB:.2f} GiB ({source}); {'; '.join(fixes)}.",
        need,
        bytes_limit,
    )
