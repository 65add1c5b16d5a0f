"""Will this run fit? Parameter, optimizer-state, gradient and activation bytes per device, estimated
from the abstract state (nothing allocated) and the config, against the memory of the device it runs on.

The training loop calls `check_fits` after building the program and before creating the state, so that
an absurd size (100000 layers, a million-row batch) is one ConfigError naming the numbers instead of an
out-of-memory crash or a machine swapping for an hour. The check belongs to running, not to compiling:
`TrainProgram.compile` (the compile-ahead analysis, the real-size presets in tests) still lowers any
size for any mesh, whatever memory this machine has.

The activation estimate is deliberately a lower bound (layer inputs, the matmul outputs a remat policy
keeps, one layer's attention scores, the logits), so a refusal means the run cannot fit, while a pass
does not promise that it will.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np

from jaxpar.config import ConfigError, RunConfig, batch_split
from jaxpar.parallel.analysis import state_bytes_per_device

GiB = 2**30


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


def activation_bytes(run: RunConfig, sizes: Mapping[str, int]) -> int:
    """A lower bound of the activation bytes one device holds for one (micro)batch's backward pass: every
    layer's input (the scan keeps it under any remat policy), the projections' outputs (kept unless
    model.remat='full'; an MoE layer's expert hidden units left out), one block of attention scores
    (model.attention_impl='xla'), the logits."""
    model, train = run.model, run.train
    itemsize = np.dtype(model.dtype).itemsize
    batch_shards, _ = batch_split(sizes)
    micro = run.pipeline.microbatches if sizes["pipeline"] > 1 else train.grad_accum_steps
    rows = max(train.global_batch // micro // batch_shards, 1)
    tensor, length = sizes["tensor"], train.seq_len // sizes["sequence"]
    # This device's tokens inside a layer; their heads, hidden units (and the residual) split over tensor.
    tokens = rows * length
    per_token = model.d_model  # the layer's input
    if model.remat != "full":  # q, k, v, the attention output, gate and up (dense), down
        projections = (model.n_heads + 2 * model.n_kv_heads) * model.head_dim + 2 * model.d_model
        per_token += projections + (0 if model.moe.experts else 2 * model.d_ff)
    total = model.n_layers // sizes["pipeline"] * tokens * per_token // tensor
    if model.mixer != "linear" and model.attention_impl == "xla":
        total += rows * model.n_heads // tensor * length * length  # one layer's scores of one block
    total += tokens * (model.vocab_size // tensor)  # the logits
    return total * itemsize


def estimate(run: RunConfig, sizes: Mapping[str, int], abstract) -> dict[str, int]:
    """Bytes per device: params, opt_state (from the abstract state's shardings), grads (as params),
    activations (a lower bound), total."""
    state = state_bytes_per_device(abstract)
    parts = {
        "params": state["params"],
        "opt_state": state["opt_state"],
        "grads": state["params"],
        "activations": activation_bytes(run, sizes),
    }
    return {**parts, "total": sum(parts.values())}


def check_fits(run: RunConfig, mesh: jax.sharding.Mesh, abstract, bytes_limit: int | None = None) -> dict:
    """Raises ConfigError when the estimate exceeds the memory of the mesh's devices (`bytes_limit`
    per device, else what `device_memory` finds); returns the estimate."""
    sizes = dict(mesh.shape)
    need = estimate(run, sizes, abstract)
    source = "as given"
    if bytes_limit is None:
        bytes_limit, source = device_memory(mesh.devices.flat[0])
    if bytes_limit is None or need["total"] <= bytes_limit:
        return need
    parts = " + ".join(
        f"{name} {need[name] / GiB:.2f}" for name in ("params", "opt_state", "grads", "activations")
    )
    state = need["params"] + need["opt_state"] + need["grads"]
    model, train = run.model, run.train
    fixes = []
    if state > bytes_limit or state >= need["activations"]:
        fixes.append(
            f"the model's state alone needs {state / GiB:.2f} GiB: shrink the model (model.n_layers="
            f"{model.n_layers}, model.d_model={model.d_model}, model.d_ff={model.d_ff}, model.vocab_size="
            f"{model.vocab_size}) or shard it over more devices (mesh.fsdp={sizes['fsdp']}, mesh.tensor="
            f"{sizes['tensor']}, mesh.pipeline={sizes['pipeline']})"
        )
    if need["activations"] > bytes_limit or need["activations"] > state:
        fixes.append(
            f"the activations alone need {need['activations'] / GiB:.2f} GiB: shrink train.global_batch="
            f"{train.global_batch} or train.seq_len={train.seq_len}, raise train.grad_accum_steps="
            f"{train.grad_accum_steps}, set model.remat='full' (now {model.remat!r}) or split the batch "
            "over more devices"
        )
    raise ConfigError(
        f"this run needs at least {need['total'] / GiB:.2f} GiB per device ({parts} GiB) but a device has "
        f"{bytes_limit / GiB:.2f} GiB ({source}); {'; '.join(fixes)}."
    )
