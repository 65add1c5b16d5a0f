"""Hugging Face safetensors <-> jaxpar parameters, tensor by tensor and shard by shard.

Each jaxpar parameter is named `blocks.attn.wq` and friends (layers stacked on a leading axis, experts on
the next); each maps to one HF tensor per layer (and expert), e.g. `model.layers.{layer}.self_attn.q_proj.
weight`. A `Tensor` says how: which HF axes split into which jaxpar axes (q_proj's [N*H, D] rows are the
heads and head_dim) and in which order they appear (a linear layer's HF [out, in] is jaxpar's [in, out]).

Import builds every parameter shard by shard: each device's block is read from the safetensors files as
just the rows and columns it holds (safetensors slices lazily from the memory-mapped file) and placed on
that device before the next is read, so beyond the placed arrays the host holds one block at a time and no
device holds more than its shard. Export gathers one layer's tensor at
a time and writes size-capped shards with an index, the layout `transformers` loads.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from collections.abc import Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxpar.interop import hf_config as hf_config_lib

INDEX = "model.safetensors.index.json"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Tensors some checkpoints carry that the model recomputes (rotary tables) or shares (a tied lm_head).
IGNORED = re.compile(r"(.*\.rotary_emb\.inv_freq$)|(^lm_head\.weight$)")


class HFWeightsError(ValueError):
    """Safetensors files that do not hold the model their config.json describes; the message names the
    file, tensor and shapes."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One jaxpar parameter as HF tensors. `name` is a template over {layer} and {expert}; the jaxpar array
    leads with `stacked` stack axes: `layer_axes` of them pick the layer (HF layer `layer_base` +
    `layer_stride` x the first, + the second when there are two: a group's inner layers), then the expert
    axis if any. `groups[i]` are the jaxpar axis sizes HF axis i splits into; `order` lists the HF axes in
    the order their groups appear in jaxpar."""

    name: str
    groups: tuple[tuple[int, ...], ...]
    order: tuple[int, ...]
    stacked: int = 0
    layer_axes: int = 0
    layer_base: int = 0
    layer_stride: int = 1

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(group) for group in self.groups)

    def name_at(self, position: tuple[int, ...]) -> str:
        """The HF name of the tensor at `position` on the stack axes."""
        layer = self.layer_base + (self.layer_stride * position[0] if self.layer_axes else 0)
        layer += position[1] if self.layer_axes == 2 else 0
        expert = position[self.layer_axes] if self.stacked > self.layer_axes else None
        return self.name.format(layer=layer, expert=expert)

    def names(self, stack_shape: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], str]]:
        """(position on the stack axes, HF name) of every HF tensor this parameter is made of."""
        for position in itertools.product(*(range(n) for n in stack_shape)):
            yield position, self.name_at(position)

    def to_hf(self, core: np.ndarray) -> np.ndarray:
        """One layer's (and expert's) jaxpar array -> the HF tensor."""
        axes = _group_axes(self.groups, self.order)
        hf_order = [axis for hf_axis in range(len(self.groups)) for axis in axes[hf_axis]]
        return np.ascontiguousarray(core.transpose(hf_order)).reshape(self.hf_shape)

    def read(self, handle, name: str, core_index: tuple[slice, ...]) -> np.ndarray:
        """The block of one HF tensor that lands on jaxpar's `core_index` (slices, without the stacked
        axes), read from the file as the contiguous rows / columns that cover it."""
        axes = _group_axes(self.groups, self.order)
        hf_index, shape, inner = [], [], []
        for hf_axis, group in enumerate(self.groups):
            slices = [core_index[axis] for axis in axes[hf_axis]]
            stride = math.prod(group[1:])
            hf_index.append(slice(slices[0].start * stride, slices[0].stop * stride))
            shape += [slices[0].stop - slices[0].start, *group[1:]]
            inner += [slice(None), *slices[1:]]
        block = handle.get_slice(name)[tuple(hf_index)].reshape(shape)[tuple(inner)]
        # block's axes are the HF groups' axes in HF order; jaxpar wants them in `order`
        flat = [axis for hf_axis in range(len(self.groups)) for axis in axes[hf_axis]]
        return block.transpose(np.argsort(flat))


def _group_axes(groups, order) -> dict[int, list[int]]:
    """HF axis -> the jaxpar (core) axes its group occupies."""
    axes, start = {}, 0
    for hf_axis in order:
        axes[hf_axis] = list(range(start, start + len(groups[hf_axis])))
        start += len(groups[hf_axis])
    return axes


@dataclasses.dataclass(frozen=True)
class _Layers:
    """Where a stack of jaxpar layers sits among the HF layers (see Tensor's layer_* fields)."""

    axes: int = 1
    base: int = 0
    stride: int = 1


def _linear(name, fan_in, fan_out, where: _Layers | None = None, expert: bool = False) -> Tensor:
    """An nn.Linear weight: HF [out, in], jaxpar [in..., out...]."""
    return _same(name, fan_out, fan_in, where=where, expert=expert, order=(1, 0))


def _same(name, *groups, where: _Layers | None = None, expert: bool = False, order=None) -> Tensor:
    where = where or _Layers(axes=0)
    order = tuple(range(len(groups))) if order is None else order
    return Tensor(name, groups, order, where.axes + expert, where.axes, where.base, where.stride)


def _layer_tensors(cfg, model_type: str, prefix: str, where: _Layers, moe: bool) -> dict[str, Tensor]:
    """The tensors of one stack of decoder layers (jaxpar paths under `prefix`)."""
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    hf = "model.layers.{layer}."
    tensors = {
        "attn_norm.scale": _same(hf + "input_layernorm.weight", (D,), where=where),
        "mlp_norm.scale": _same(hf + "post_attention_layernorm.weight", (D,), where=where),
        "attn.wq": _linear(hf + "self_attn.q_proj.weight", (D,), (N, H), where),
        "attn.wk": _linear(hf + "self_attn.k_proj.weight", (D,), (K, H), where),
        "attn.wv": _linear(hf + "self_attn.v_proj.weight", (D,), (K, H), where),
        "attn.wo": _linear(hf + "self_attn.o_proj.weight", (N, H), (D,), where),
    }
    if cfg.attention_bias:
        for which, heads in (("q", N), ("k", K), ("v", K)):
            tensors[f"attn.b{which}"] = _same(hf + f"self_attn.{which}_proj.bias", (heads, H), where=where)
    if cfg.qk_norm:
        for which in ("q", "k"):
            tensors[f"attn.{which}_norm.scale"] = _same(
                hf + f"self_attn.{which}_norm.weight", (H,), where=where
            )
    swiglu = (("w_gate", "gate_proj", 0), ("w_up", "up_proj", 0), ("w_down", "down_proj", 1))
    if not moe:
        for ours, theirs, down in swiglu:
            fans = ((F,), (D,)) if down else ((D,), (F,))
            tensors[f"mlp.{ours}"] = _linear(hf + f"mlp.{theirs}.weight", *fans, where)
        return {prefix + path: tensor for path, tensor in tensors.items()}
    E, Fe = cfg.moe.experts, cfg.moe.d_ff
    mixtral = model_type == "mixtral"
    moe_hf = hf + ("block_sparse_moe." if mixtral else "mlp.")
    tensors["moe.router"] = _linear(moe_hf + "gate.weight", (D,), (E,), where)
    for (ours, theirs, down), mixtral_name in zip(swiglu, ("w1", "w3", "w2")):
        fans = ((Fe,), (D,)) if down else ((D,), (Fe,))
        name = moe_hf + "experts.{expert}." + (mixtral_name if mixtral else theirs) + ".weight"
        tensors[f"moe.{ours}"] = _linear(name, *fans, where, expert=True)
    if cfg.moe.shared_experts:  # Qwen2-MoE's one shared expert of shared_experts x moe.d_ff units
        Fs = cfg.moe.shared_experts * Fe
        for ours, theirs, down in swiglu:
            fans = ((Fs,), (D,)) if down else ((D,), (Fs,))
            tensors[f"shared.{ours}"] = _linear(moe_hf + f"shared_expert.{theirs}.weight", *fans, where)
    if cfg.moe.shared_gate:
        tensors["shared_gate"] = _linear(moe_hf + "shared_expert_gate.weight", (D,), (1,), where)
    return {prefix + path: tensor for path, tensor in tensors.items()}


def tensor_map(cfg) -> dict[str, Tensor]:
    """jaxpar parameter path ('blocks.attn.wq') -> its HF tensors, for a ModelConfig of a supported family."""
    model_type = hf_config_lib.model_type_of(cfg)
    V, D = cfg.vocab_size, cfg.d_model
    tensors = {
        "embed": _same("model.embed_tokens.weight", (V,), (D,)),
        "final_norm.scale": _same("model.norm.weight", (D,)),
    }
    if not cfg.tie_embeddings:
        tensors["unembed"] = _linear("lm_head.weight", (D,), (V,))
    moe = cfg.moe
    if not (moe.experts and moe.mixed):
        return tensors | _layer_tensors(cfg, model_type, "blocks.", _Layers(), bool(moe.experts))
    first, every = moe.first_dense, moe.every
    if first:
        tensors |= _layer_tensors(cfg, model_type, "first.", _Layers(), moe=False)
    if every == 1:
        return tensors | _layer_tensors(cfg, model_type, "blocks.", _Layers(base=first), moe=True)
    inner = _Layers(axes=2, base=first, stride=every)
    last = _Layers(base=first + every - 1, stride=every)
    tensors |= _layer_tensors(cfg, model_type, "blocks.inner.", inner, moe=False)
    return tensors | _layer_tensors(cfg, model_type, "blocks.last.", last, moe=True)


# Parameters with no HF counterpart, created at import (and left out of export): the router's selection bias
# of bias balancing, zero (and unused) in the families HF has.
NOT_IN_HF = re.compile(r"(.*\.)?moe\.router_bias$")


# --- import ------------------------------------------------------------------------------------------------


def tensor_files(directory: str) -> dict[str, str]:
    """HF tensor name -> the safetensors file holding it (from the index, or every *.safetensors)."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            return {name: os.path.join(directory, file) for name, file in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise HFWeightsError(
                f"{index} is not a safetensors index ({error!r}); fix or delete it."
            ) from None
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise HFWeightsError(f"{directory} has no *.safetensors files (and no {INDEX}); nothing to load.")
    where = {}
    for file in files:
        with _open(os.path.join(directory, file)) as handle:
            where |= {name: os.path.join(directory, file) for name in handle.keys()}
    return where


def _open(file: str):
    """safe_open, with a missing or unreadable file as one HFWeightsError naming it."""
    try:
        return safe_open(file, framework="numpy")
    except Exception as error:  # FileNotFoundError, or safetensors' own error for a damaged header
        raise HFWeightsError(
            f"cannot read {file}: {error} (missing, truncated or not safetensors)."
        ) from None


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": x}} -> {"a.b": x}: nnx pure-dict parameters by their dotted path."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out |= flatten(value, path + ".") if isinstance(value, Mapping) else {path: value}
    return out


def unflatten(flat: Mapping[str, object]) -> dict:
    """The inverse of `flatten`."""
    out: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def check_tensors(directory: str, cfg, abstract: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, str]:
    """Every tensor the model needs is in `directory` with the shape the config implies, before any is
    read; returns tensor name -> file. Extra tensors (other than the known unused ones) are an error too:
    they mean the checkpoint holds something the model would silently drop."""
    where = tensor_files(directory)
    tensors, needed = tensor_map(cfg), set()
    for path, spec in tensors.items():
        stack_shape = abstract[path].shape[: spec.stacked]
        for _, name in spec.names(stack_shape):
            needed.add(name)
            if name not in where:
                raise HFWeightsError(
                    f"{directory} has no tensor {name!r} (for jaxpar's {path}); is it the "
                    "checkpoint its config.json describes?"
                )
            with _open(where[name]) as handle:
                shape = tuple(handle.get_slice(name).get_shape())
            if shape != spec.hf_shape:
                raise HFWeightsError(
                    f"tensor {name!r} in {where[name]} has shape {list(shape)}; config.json implies "
                    f"{list(spec.hf_shape)}."
                )
    extra = sorted(name for name in set(where) - needed if not IGNORED.match(name))
    if extra:
        raise HFWeightsError(
            f"{directory} holds {len(extra)} tensors the model has no place for, e.g. {extra[:3]}; jaxpar "
            "would drop them. Check config.json's architecture options."
        )
    return where


def load_params(directory: str, cfg, abstract: Mapping) -> dict:
    """The model's parameters as a nested dict of jax.Arrays (nnx pure-dict layout), placed like
    `abstract` (same layout, ShapeDtypeStructs carrying NamedShardings). Each addressable shard is read on
    its own from the files; nothing else is materialised."""
    abstract = flatten(abstract)
    where = check_tensors(directory, cfg, abstract)
    tensors = tensor_map(cfg)
    handles: dict[str, object] = {}

    def handle(name):
        file = where[name]
        if file not in handles:
            handles[file] = _open(file)
        return handles[file]

    def build(path: str, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if NOT_IN_HF.match(path):
            return jax.device_put(np.zeros(leaf.shape, leaf.dtype), leaf.sharding)
        spec = tensors[path]

        def shard(index: tuple[slice, ...]) -> np.ndarray:
            index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, leaf.shape))
            stacked, core = index[: spec.stacked], index[spec.stacked :]
            blocks = []
            for position in itertools.product(*(range(s.start, s.stop) for s in stacked)):
                name = spec.name_at(position)
                blocks.append(spec.read(handle(name), name, core))
            block = np.stack(blocks) if spec.stacked else blocks[0]
            lengths = tuple(s.stop - s.start for s in stacked)
            return block.reshape(lengths + block.shape[1 if spec.stacked else 0 :]).astype(leaf.dtype)

        # Shard by shard: each block goes to its device before the next is read, so the host holds one
        # device's block at a time (make_array_from_callback would hold every device's block at once).
        devices = leaf.sharding.addressable_devices_indices_map(leaf.shape)
        blocks = [jax.device_put(shard(index), device) for device, index in devices.items()]
        return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, blocks)

    missing = {path for path in set(abstract) - set(tensors) if not NOT_IN_HF.match(path)}
    if missing:
        raise HFWeightsError(f"jaxpar parameters {sorted(missing)} have no Hugging Face tensor mapping.")
    try:
        return unflatten({path: build(path, leaf) for path, leaf in abstract.items()})
    finally:
        handles.clear()


# --- export ------------------------------------------------------------------------------------------------


def save_params(
    params: Mapping, cfg, directory: str, *, dtype: str = "float32", max_shard_mb: int = 2048
) -> list[str]:
    """Writes `params` (nnx pure-dict layout, jax.Arrays anywhere on the mesh) as HF safetensors files of at
    most max_shard_mb (planned from the shapes first, then written one file at a time, each layer's tensor
    gathered on its own) plus model.safetensors.index.json. Returns the files written."""
    flat, tensors = flatten(params), tensor_map(cfg)
    cast = np.dtype(DTYPES[dtype])
    plan: list[list[tuple[str, tuple[int, ...], str]]] = [[]]  # per file: (path, layer[, expert], HF name)
    size, sizes = 0, [0]
    for path, spec in tensors.items():
        nbytes = math.prod(spec.hf_shape) * cast.itemsize
        for position, name in spec.names(flat[path].shape[: spec.stacked]):
            if sizes[-1] and sizes[-1] + nbytes > max_shard_mb * 2**20:
                plan.append([])
                sizes.append(0)
            plan[-1].append((path, position, name))
            sizes[-1] += nbytes
            size += nbytes
    names = (
        ["model.safetensors"]
        if len(plan) == 1
        else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    )
    os.makedirs(directory, exist_ok=True)
    weight_map = {}
    for file, entries in zip(names, plan):
        shard = {}
        for path, position, name in entries:
            array = flat[path][position] if position else flat[path]
            shard[name] = tensors[path].to_hf(np.asarray(jax.device_get(array))).astype(cast)
            weight_map[name] = file
        save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return [*names, INDEX]
