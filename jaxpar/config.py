"""Typed, frozen run configuration, built from an ml_collections ConfigDict at one boundary.

Every check of a configuration lives here, so that a bad value fails with one clear message before
anything is traced or compiled. `from_config_dict` is the boundary: it rejects unknown keys and wrong
types, then each dataclass validates itself in `__post_init__`: every int and float field against its
class's `RANGES` table (`check_ranges`; a test fails on a field without an entry), then the checks across
its fields. Checks that need the device count (the mesh) or several sections together run in
`validate_run`. `check_overrides` meets a misspelled `--config.KEY` on a command line before absl's flag
parser does.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import numbers
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from jaxpar.interop import hf_config
from jaxpar.kernels import attention as attention_lib
from jaxpar.parallel import sequence as sequence_lib
from jaxpar.parallel.mesh import MESH_AXES
from jaxpar.parallel.rules import mesh_axes
from jaxpar.parallel.schedules import SCHEDULES, Schedule, ScheduleError, cached_schedule

# Token mixers: softmax attention, linear attention (LASP-2 when sequence-parallel), or both interleaved.
MIXERS = ("softmax", "linear", "hybrid")
# model.remat: what the backward keeps of a layer (jaxpar.models.llama.remat_policy)
REMATS = ("none", "full", "save_dots", "offload", "save_names", "offload_names")
# the activations a block names for the names-based policies: q, k, v after RoPE; the attention kernel's
# output before the output projection; the SwiGLU product
REMAT_NAMES = ("qkv", "attention", "mlp_hidden")
LINEAR_GATES = ("none", "scalar")  # plain linear attention, or a data-dependent decay per KV head


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the value and the fix."""


def require(condition: bool, message: str) -> None:
    """ConfigError(message) unless condition: every check of a config (here and in jaxpar.rl.config)."""
    if not condition:
        raise ConfigError(message)


def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    require(value in allowed, f"{name}={value!r} is not supported; choose one of {list(allowed)}.")


@dataclasses.dataclass(frozen=True)
class Bound:
    """The values one numeric config field may take: a finite number (an int for an int field) in
    [low, high], an end excluded when `low_open` / `high_open` and unbounded when None; or exactly
    `special`, a sentinel outside that range (-1: "all remaining"). `means` says what the field (or its
    0 / its sentinel) means, for the error message.

    Every config dataclass holds a `RANGES` table, field name -> Bound, covering each of its int and
    float fields (tests/test_config_ranges.py walks them all), applied by `check_ranges`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: int | None = None
    means: str = ""

    def admits(self, value: float) -> bool:
        if self.special is not None and value == self.special:
            return True
        if not math.isfinite(value):  # NaN and inf, whatever the bounds
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, integer: bool) -> str:
        """'a positive int or -1', 'a finite number in [0, 1)', 'a finite number > 0', ..."""
        if integer and self.low == 1 and not self.low_open and self.high is None:
            text = "a positive int"
        else:
            text = "an int" if integer else "a finite number"
            if self.low is not None and self.high is not None:
                opening, closing = "(["[not self.low_open], ")]"[not self.high_open]
                text += f" in {opening}{self.low}, {self.high}{closing}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {self.high}"
        if self.special is not None:
            text += f" or {self.special}"
        return text + (f" ({self.means})" if self.means else "")


# The common bounds, for the RANGES tables.
COUNT = Bound(low=1)  # a positive int
OPTIONAL_COUNT = Bound(low=0)  # an int >= 0
POSITIVE = Bound(low=0, low_open=True)  # a finite number > 0
NON_NEGATIVE = Bound(low=0)  # a finite number >= 0
SEED = Bound(low=0, high=2**32, high_open=True)


@functools.cache
def _numeric_fields(cls: type) -> dict[str, tuple[type, Any]]:
    """name -> (int or float, default) of a config dataclass's numeric fields (bools excluded)."""
    hints = typing.get_type_hints(cls)
    return {
        field.name: (hints[field.name], field.default)
        for field in dataclasses.fields(cls)
        if hints[field.name] in (int, float)
    }


def check_ranges(config, section: str) -> None:
    """Every int and float field of a config dataclass against its class's RANGES table: wrong types,
    NaN, inf and out-of-range values are ConfigErrors naming `section.field`, the range and the default.
    Called first in each `__post_init__`; checks across fields follow it there (or in `validate_run`)."""
    ranges = getattr(type(config), "RANGES", {})
    for name, (kind, default) in _numeric_fields(type(config)).items():
        value, label = getattr(config, name), f"{section}.{name}"
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        require(
            number and (kind is float or isinstance(value, numbers.Integral)),
            f"{label}={value!r} has type {type(value).__name__}; expected {kind.__name__}.",
        )
        bound = ranges.get(name)
        if bound is not None:  # a field without one fails tests/test_config_ranges.py
            require(
                bound.admits(value),
                f"{label}={value} must be {bound.describe(kind is int)}; the default is {default}.",
            )


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts MLPs. `experts=0` keeps every MLP dense."""

    experts: int = 0
    top_k: int = 2
    d_ff: int = 256
    shared_experts: int = 0
    router: str = "softmax"
    capacity_factor: float = 0.0  # 0: dropless (grouped matmul); > 0: tokens over capacity are dropped
    balance: str = "aux_loss"  # or "bias": DeepSeek-V3 auxiliary-loss-free bias balancing
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    bias_update_rate: float = 1e-3
    normalize_weights: bool = True  # softmax router: renormalise the top-k weights to sum to 1 (Mixtral)
    shared_gate: bool = False  # the shared experts' output scaled by a per-token sigmoid gate (Qwen2-MoE)
    first_dense: int = 0  # the first layers keep a dense MLP (DeepSeek's first_k_dense_replace)
    every: int = (
        1  # after those, every `every`-th layer is MoE, the others dense (Qwen's decoder_sparse_step)
    )

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {
        "experts": Bound(low=0, means="0 = dense MLPs"),
        "top_k": Bound(low=1, means="experts per token, at most model.moe.experts"),
        "d_ff": COUNT,
        "shared_experts": OPTIONAL_COUNT,
        "capacity_factor": Bound(low=0, means="0 = dropless"),
        "aux_loss_coef": NON_NEGATIVE,
        "z_loss_coef": NON_NEGATIVE,
        "bias_update_rate": NON_NEGATIVE,
        "first_dense": Bound(low=0, means="dense layers before the first MoE layer"),
        "every": Bound(low=1, means="1 = every layer after model.moe.first_dense is MoE"),
    }

    def __post_init__(self):
        check_ranges(self, "model.moe")
        if self.experts:
            require(
                1 <= self.top_k <= self.experts,
                f"model.moe.top_k={self.top_k} must be between 1 and model.moe.experts={self.experts}.",
            )
        one_of("model.moe.router", self.router, ("softmax", "sigmoid"))
        one_of("model.moe.balance", self.balance, ("aux_loss", "bias"))
        require(
            not self.shared_gate or self.shared_experts,
            "model.moe.shared_gate=True gates the shared experts; set model.moe.shared_experts >= 1.",
        )

    @property
    def mixed(self) -> bool:
        """Whether dense and MoE layers alternate (first_dense or every set) rather than all being MoE."""
        return self.first_dense > 0 or self.every > 1

    def moe_layers(self, n_layers: int) -> int:
        """How many of n_layers are MoE layers."""
        return (n_layers - self.first_dense) // self.every if self.experts else 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    d_ff: int = 384
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_impl: str = "xla"
    remat: str = "none"
    remat_names: str = "attention"  # what remat 'save_names' / 'offload_names' keep, comma separated
    param_dtype: str = "float32"
    dtype: str = "float32"
    init_std: float = 0.02
    sequence_parallel: str = "ring"  # used when mesh.sequence > 1; see jaxpar.parallel.sequence
    ulysses_degree: int = 0  # usp: Ulysses group size inside the sequence axis (0: the largest that fits)
    mixer: str = "softmax"
    softmax_every: int = 4  # hybrid: every softmax_every-th layer is softmax attention, the rest linear
    linear_gate: str = "scalar"  # linear attention: "none" (plain) or "scalar" (gated decay per KV head)
    linear_chunk: int = 64  # linear attention chunk length
    sliding_window: int = 0  # softmax attention sees the newest sliding_window tokens (Mistral); 0: all
    attention_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3)
    rope_scaling: str = "none"  # "llama3": Llama 3.1's frequency-dependent stretch of the rotary waves
    rope_factor: float = 8.0  # llama3 scaling: how much the long waves are stretched
    rope_low_freq_factor: float = 1.0  # llama3 scaling: waves longer than original_max_len / this: stretched
    rope_high_freq_factor: float = 4.0  # llama3 scaling: waves shorter than original_max_len / this: kept
    rope_original_max_len: int = 8192  # llama3 scaling: the context the model was first trained on
    hf_path: str = ""  # a Hugging Face checkpoint directory: architecture from its config.json, weights too
    medusa_heads: int = 0  # Medusa-1 decoding heads on the final hidden state (jaxpar.models.medusa); 0: none
    moe: MoEConfig = MoEConfig()

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {
        "vocab_size": COUNT,
        "d_model": COUNT,
        "n_layers": COUNT,
        "n_heads": COUNT,
        "n_kv_heads": COUNT,
        "head_dim": COUNT,
        "d_ff": COUNT,
        "max_seq_len": COUNT,
        "rope_theta": Bound(low=1, low_open=True, means="the base of the rotary frequencies"),
        "norm_eps": Bound(low=0, low_open=True, means="added to the RMS before dividing by it"),
        "init_std": POSITIVE,
        "ulysses_degree": Bound(low=0, means="0 = the largest that fits"),
        "softmax_every": COUNT,
        "linear_chunk": COUNT,
        "sliding_window": Bound(low=0, means="0 = every earlier token"),
        "rope_factor": Bound(low=1, means="llama3 rope scaling: 1 = no stretch"),
        "rope_low_freq_factor": POSITIVE,
        "rope_high_freq_factor": POSITIVE,
        "rope_original_max_len": COUNT,
        "medusa_heads": Bound(low=0, high=16, means="0 = no Medusa heads"),
    }

    def __post_init__(self):
        check_ranges(self, "model")
        require(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}; "
            "grouped-query attention needs every KV head to serve the same number of query heads.",
        )
        one_of("model.attention_impl", self.attention_impl, attention_lib.IMPLEMENTATIONS)
        one_of("model.remat", self.remat, REMATS)
        for name in self.remat_name_list:
            one_of("model.remat_names", name, REMAT_NAMES)
        require(
            self.remat not in ("save_names", "offload_names") or bool(self.remat_name_list),
            f"model.remat={self.remat!r} keeps the activations named in model.remat_names, which is empty; "
            f"name some of {', '.join(REMAT_NAMES)} (comma separated).",
        )
        one_of("model.param_dtype", self.param_dtype, ("float32", "bfloat16"))
        one_of("model.dtype", self.dtype, ("float32", "bfloat16"))
        one_of("model.sequence_parallel", self.sequence_parallel, sequence_lib.VARIANTS)
        one_of("model.mixer", self.mixer, MIXERS)
        one_of("model.linear_gate", self.linear_gate, LINEAR_GATES)
        one_of("model.rope_scaling", self.rope_scaling, ("none", "llama3"))
        require(
            self.mixer == "softmax" or not (self.attention_bias or self.qk_norm),
            f"model.attention_bias / model.qk_norm belong to softmax attention; model.mixer={self.mixer!r} "
            "has linear-attention layers. Use mixer 'softmax' or turn them off.",
        )
        require(
            self.rope_scaling != "llama3" or self.rope_high_freq_factor > self.rope_low_freq_factor,
            f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
            f"model.rope_low_freq_factor={self.rope_low_freq_factor} (llama3 rope blends between "
            "them).",
        )
        require(
            not (self.sliding_window and self.mixer == "linear"),
            f"model.sliding_window={self.sliding_window} applies to softmax attention; model.mixer='linear' "
            "has none. Set model.sliding_window=0 or use mixer 'softmax' or 'hybrid'.",
        )
        if self.moe.experts and self.moe.mixed:
            moe = self.moe
            require(
                moe.first_dense < self.n_layers and (self.n_layers - moe.first_dense) % moe.every == 0,
                f"model.moe.first_dense={moe.first_dense} dense layers, then groups of "
                f"model.moe.every={moe.every} (the last of each MoE) must fill "
                f"model.n_layers={self.n_layers}: n_layers - first_dense must be a positive multiple of "
                "every.",
            )
            require(
                self.mixer == "softmax",
                f"model.moe.first_dense / model.moe.every (a mix of dense and MoE layers) with "
                f"model.mixer={self.mixer!r}: only softmax-attention models take this layout.",
            )
        if self.mixer == "hybrid":
            require(
                self.softmax_every >= 2 and self.n_layers % self.softmax_every == 0,
                f"model.mixer='hybrid' repeats groups of model.softmax_every={self.softmax_every} layers "
                f"(the last one softmax); it must be >= 2 and divide model.n_layers={self.n_layers}.",
            )

    @property
    def n_params(self) -> int:
        """Parameter count (embeddings included; every expert counted)."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        attn += self.attention_bias * self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        attn += self.qk_norm * 2 * self.head_dim
        dense_mlp = 3 * self.d_model * self.d_ff
        moe_mlp = 3 * self.d_model * self.moe.d_ff * (
            self.moe.experts + self.moe.shared_experts
        ) + self.d_model * (self.moe.experts + self.moe.shared_gate)
        moe_layers = self.moe.moe_layers(self.n_layers)
        mlp = moe_layers * moe_mlp + (self.n_layers - moe_layers) * dense_mlp
        per_layer = attn + 2 * self.d_model
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return (
            self.n_layers * per_layer + mlp + self.linear_layers * self._linear_extra + embed + self.d_model
        )

    @property
    def remat_name_list(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.remat_names.split(",") if name.strip())

    def zigzag_factor(self, mesh_sizes: Mapping[str, int]) -> int:
        """The n of the zigzag token layout this model uses on a mesh of these axis sizes (1: contiguous):
        what the data pipeline applies (jaxpar.parallel.sequence.zigzag_batch) and every layer assumes."""
        tensor = mesh_sizes.get("tensor", 1)
        return sequence_lib.model_zigzag_factor(
            self.sequence_parallel,
            self.mixer,
            mesh_sizes.get("sequence", 1),
            self.n_heads // tensor,
            self.n_kv_heads // tensor,
            self.ulysses_degree,
        )

    @property
    def linear_layers(self) -> int:
        """How many layers mix tokens by linear attention (mixer 'linear' or 'hybrid')."""
        if self.mixer == "hybrid":
            return self.n_layers - self.n_layers // self.softmax_every
        return self.n_layers if self.mixer == "linear" else 0

    @property
    def _linear_extra(self) -> int:
        """Parameters a linear-attention layer has beyond softmax attention's: the output norm scale, and
        the decay gate (weights and bias per KV head) when gated."""
        gate = self.d_model * self.n_kv_heads + self.n_kv_heads if self.linear_gate == "scalar" else 0
        return self.head_dim + gate


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device counts per mesh axis; -1 takes all devices the other axes leave."""

    pipeline: int = 1
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    sequence: int = 1
    tensor: int = 1

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {
        name: Bound(low=1, special=-1, means="-1: all the devices the other axes leave") for name in MESH_AXES
    }

    def __post_init__(self):
        check_ranges(self, "mesh")
        sizes = self.as_dict()
        require(
            sum(size == -1 for size in sizes.values()) <= 1,
            f"mesh={sizes} has more than one axis set to -1; at most one axis can take the remaining "
            "devices.",
        )

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 filled in; raises unless their product is exactly `num_devices`."""
        sizes = self.as_dict()
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if -1 in sizes.values():
            require(
                num_devices % fixed == 0,
                f"mesh={self.as_dict()} cannot fill {num_devices} devices: the fixed axes multiply to "
                f"{fixed}, "
                f"which does not divide {num_devices}.",
            )
            sizes = {name: (num_devices // fixed if size == -1 else size) for name, size in sizes.items()}
        product = math.prod(sizes.values())
        require(
            product == num_devices,
            f"mesh={sizes} uses {product} devices but {num_devices} are present; make the product of the "
            f"mesh axes equal {num_devices} (or set one axis to -1).",
        )
        return sizes


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. `stdlib`: the Python standard library's own sources (no download). `text`:
    local text files matched by `path` (a glob). Both are byte tokens unless `tokenizer` names a real one
    (then tokenized in memory at start, EOS after each file). `tokens`: pre-tokenized flat binary files
    (numpy `token_dtype`), memory mapped: a directory written by scripts/prepare_data.py (or its
    manifest.json), whose manifest is checked against the model and the tokenizer, or a glob of plain files.

    `tokenizer`: "" (bytes for stdlib/text; for a prepared directory, the tokenizer its manifest names),
    "bytes", or a tokenizer.json / a directory holding one. The run keeps a copy in <workdir>/tokenizer/,
    which generation decodes with."""

    source: str = "stdlib"
    path: str = ""
    token_dtype: str = "uint16"
    tokenizer: str = ""
    eval_fraction: float = 0.02
    shuffle: bool = True
    seed: int = 0

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {
        "eval_fraction": Bound(low=0, high=1, low_open=True, high_open=True, means="the held-out share"),
        "seed": SEED,
    }

    def __post_init__(self):
        check_ranges(self, "data")
        one_of("data.source", self.source, ("stdlib", "text", "tokens"))
        one_of("data.token_dtype", self.token_dtype, ("uint16", "uint32"))
        require(
            self.source == "stdlib" or self.path,
            f"data.source={self.source!r} needs data.path (a glob of files), e.g. "
            "--config.data.path='/data/*.txt'.",
        )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """config.optimizer. `name` picks the update of the weight matrices (the parameters whose logical
    axes are all hidden dimensions, after any stacked "layers"/"expert" axes); embeddings, the output
    layer, norms, biases and the MoE router always get AdamW (b1, b2, eps). One learning rate and
    schedule drive both (Muon's update is scaled to AdamW's RMS, GaLore's by galore_scale).

    adamw         AdamW on everything.
    muon          orthogonalised Nesterov momentum (muon_momentum, muon_ns_steps Newton-Schulz steps);
                  muon_layout "gathered" runs Newton-Schulz on whole matrices, "sharded" leaves the
                  matmuls to the compiler on the parameters' shards (same math, other communication).
    galore_adamw  Adam on gradients projected to rank galore_rank, projection from the top singular vectors
                  of the gradient (eigh of its smaller Gram matrix)
                  every galore_update_every steps, update projected back and scaled by galore_scale.
    soap          Adam in the eigenbasis of Shampoo's preconditioners (EMA soap_shampoo_beta),
                  refreshed every soap_precondition_every steps."""

    name: str = "adamw"
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    muon_layout: str = "gathered"
    galore_rank: int = 64
    galore_update_every: int = 200
    galore_scale: float = 0.25
    soap_precondition_every: int = 10
    soap_shampoo_beta: float = 0.95

    NAMES: typing.ClassVar[tuple[str, ...]] = ("adamw", "muon", "galore_adamw", "soap")
    MUON_LAYOUTS: typing.ClassVar[tuple[str, ...]] = ("gathered", "sharded")
    RANGES: typing.ClassVar[Mapping[str, Bound]] = {
        "learning_rate": Bound(low=0, low_open=True, means="the peak of the warmup-cosine schedule"),
        "min_lr_ratio": Bound(low=0, high=1, means="the final learning rate over the peak"),
        "warmup_steps": Bound(low=0, means="steps of the linear ramp from 0 to the peak"),
        "b1": Bound(low=0, high=1, high_open=True, means="Adam's first-moment decay"),
        "b2": Bound(low=0, high=1, high_open=True, means="Adam's second-moment decay"),
        "eps": Bound(low=0, low_open=True, means="added to Adam's denominator"),
        "weight_decay": Bound(low=0, means="decoupled, 0 = none; a negative one grows the weights"),
        "grad_clip_norm": Bound(
            low=0, low_open=True, means="the global gradient norm clipped to; 0 would zero every gradient"
        ),
        "muon_momentum": Bound(low=0, high=1, high_open=True, means="Muon's momentum decay"),
        "muon_ns_steps": Bound(low=1, high=20, means="Newton-Schulz iterations per step"),
        "galore_rank": Bound(
            low=1, means="rank of GaLore's projection, capped at each matrix's smaller side"
        ),
        "galore_update_every": Bound(low=1, means="steps between refreshes of GaLore's projection"),
        "galore_scale": Bound(low=0, low_open=True, means="GaLore's update scale (alpha)"),
        "soap_precondition_every": Bound(low=1, means="steps between SOAP's eigenbasis refreshes"),
        "soap_shampoo_beta": Bound(low=0, high=1, high_open=True, means="decay of SOAP's Shampoo factors"),
    }

    def __post_init__(self):
        one_of("optimizer.name", self.name, self.NAMES)
        check_ranges(self, "optimizer")
        one_of("optimizer.muon_layout", self.muon_layout, self.MUON_LAYOUTS)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """What to do when the newest checkpoint fails its checksums on restore: "stop" (name the corrupt step
    and exit; nothing is deleted) or "fallback" (resume from the newest intact step instead; the corrupt
    one stays on disk)."""

    on_corrupt: str = "stop"

    def __post_init__(self):
        one_of("checkpoint.on_corrupt", self.on_corrupt, ("stop", "fallback"))


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """config.offload: state kept in pinned host memory instead of the device's (jaxpar.train.offload).
    optimizer_state: the optimizer's state (AdamW moments) lives on the host and is streamed to the device
    for the update, its result written back; the parameters and gradients stay on the device.
    params: the parameters (their FSDP shards) live on the host; the layer scan copies each layer's onto
    the device when it runs it (forward and backward), the rest (embedding, final norm, head) is copied in
    at the start of the step, and the update copies them in and writes the result back."""

    optimizer_state: bool = False
    params: bool = False

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    global_batch: int = 16
    seq_len: int = 128
    grad_accum_steps: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    init_from: str = ""  # a base run's workdir: its newest checkpoint's parameters start this run (fresh
    # optimizer, step 0); parameters it lacks (Medusa heads) start from their init
    device_memory_gb: float = 0.0  # GiB per device for the fit check (jaxpar.train.fit); 0: ask the device

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {
        "device_memory_gb": Bound(low=0, means="0 = what the device reports"),
        "steps": COUNT,
        "global_batch": COUNT,
        "seq_len": COUNT,
        "grad_accum_steps": COUNT,
        "seed": SEED,
        "log_every": COUNT,
        "eval_every": Bound(low=0, means="0 = never"),
        "eval_batches": COUNT,
        "checkpoint_every": Bound(low=0, means="0 = only at the end"),
        "keep_checkpoints": COUNT,
    }

    def __post_init__(self):
        check_ranges(self, "train")
        require(
            self.global_batch % self.grad_accum_steps == 0,
            f"train.global_batch={self.global_batch} is not divisible by train.grad_accum_steps="
            f"{self.grad_accum_steps}; each accumulation step takes an equal share of the batch.",
        )


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """config.pipeline: how the layers on the `pipeline` mesh axis are scheduled.

    schedule: one of SCHEDULES. microbatches (M): the global batch is cut into M microbatches (this
    replaces train.grad_accum_steps for the pipelined step). virtual_stages (V): chunks per device
    (interleaved_1f1b; gpipe with V > 1 is the looped GPipe). split_backward: run each backward of
    gpipe / 1f1b / interleaved_1f1b as B (input gradient) then W (weight gradient) in the stage's next
    tick, so that lockstep ticks stay forward-sized (zero_bubble is always split); same memory."""

    schedule: str = "1f1b"
    microbatches: int = 4
    virtual_stages: int = 1
    split_backward: bool = False

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {"microbatches": COUNT, "virtual_stages": COUNT}

    def __post_init__(self):
        one_of("pipeline.schedule", self.schedule, SCHEDULES)
        check_ranges(self, "pipeline")
        require(
            self.virtual_stages == 1 or self.schedule in ("gpipe", "interleaved_1f1b"),
            f"pipeline.virtual_stages={self.virtual_stages} needs pipeline.schedule="
            f"'interleaved_1f1b' (or 'gpipe', the looped GPipe); {self.schedule!r} runs one chunk "
            "per stage.",
        )

    def validate(self, model_cfg: ModelConfig, mesh_sizes: Mapping[str, int], global_batch: int) -> None:
        """Checks that need the model, the mesh and the batch; raises ConfigError naming the fix."""
        stages = mesh_sizes.get("pipeline", 1)
        M, V = self.microbatches, self.virtual_stages
        chunks = stages * V
        require(
            model_cfg.n_layers % chunks == 0,
            f"model.n_layers={model_cfg.n_layers} is not divisible by mesh.pipeline*pipeline.virtual_stages="
            f"{stages}*{V}={chunks}; every (virtual) stage takes an equal contiguous slice of layers. Choose "
            f"n_layers as a multiple of {chunks}, or a mesh.pipeline / virtual_stages that divides "
            f"{model_cfg.n_layers}.",
        )
        if self.schedule in ("1f1b", "interleaved_1f1b", "zero_bubble"):
            require(
                M >= stages,
                f"pipeline.microbatches={M} < mesh.pipeline={stages}: {self.schedule} needs at least one "
                f"microbatch per stage to fill the pipeline (M >= P; M >= 4P keeps the bubble under 20%).",
            )
        if self.schedule == "interleaved_1f1b" and V > 1:
            require(
                M % stages == 0,
                f"pipeline.microbatches={M} is not a multiple of mesh.pipeline={stages}; "
                "interleaved_1f1b walks microbatches through the chunks in groups of P.",
            )
        require(
            global_batch % M == 0,
            f"train.global_batch={global_batch} is not divisible by pipeline.microbatches={M}; every "
            "microbatch takes an equal share of the batch.",
        )
        batch_shards = mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1)
        require(
            (global_batch // M) % batch_shards == 0,
            f"train.global_batch={global_batch} / pipeline.microbatches={M} = {global_batch // M} rows per "
            f"microbatch, not divisible by mesh.data*mesh.fsdp={batch_shards}; pick a global batch that is a "
            f"multiple of {M * batch_shards}.",
        )
        vocab_shards = stages * mesh_sizes.get("tensor", 1)
        require(
            model_cfg.vocab_size % vocab_shards == 0,
            f"model.vocab_size={model_cfg.vocab_size} is not divisible by mesh.pipeline*mesh.tensor="
            f"{vocab_shards}; the embedding and output layer are split over the vocabulary across pipeline "
            f"stages (and tensor shards). Pad the vocabulary to a multiple of {vocab_shards}.",
        )
        require(
            model_cfg.moe.experts == 0,
            f"model.moe.experts={model_cfg.moe.experts}: the pipeline runs dense blocks only (the MoE "
            "router's auxiliary losses and statistics are not carried through the stages yet); use "
            "model.moe.experts=0 or mesh.pipeline=1.",
        )
        require(
            model_cfg.mixer == "softmax",
            f"model.mixer={model_cfg.mixer!r}: the pipeline stages run softmax-attention blocks only; "
            "use model.mixer='softmax' or mesh.pipeline=1.",
        )
        for axis in ("expert", "sequence"):
            require(
                mesh_sizes.get(axis, 1) == 1,
                f"mesh.{axis}={mesh_sizes.get(axis)}: the pipeline does not compose with {axis} "
                f"parallelism yet; set mesh.{axis}=1.",
            )

    def make_schedule(self, num_stages: int) -> Schedule:
        """The validated table for `num_stages` devices on the pipeline axis (cached)."""
        try:
            return cached_schedule(
                self.schedule, num_stages, self.microbatches, self.virtual_stages, self.split_backward
            )
        except ScheduleError as error:
            raise ConfigError(str(error)) from error


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    pipeline: PipelineConfig = PipelineConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    offload: OffloadConfig = OffloadConfig()


def unknown_keys_message(section: str, unknown: Iterable[str], known: Iterable[str]) -> str:
    """The one message for misspelled config keys (of `section`; "" for the top level's sections), with
    a did-you-mean for each that is close to a known one."""
    unknown, known = sorted(unknown), sorted(known)
    prefix = f"{section}." if section else ""
    if section:
        message = f"unknown config key(s) {[prefix + k for k in unknown]}; known keys of {section}: {known}."
    else:
        message = f"unknown config section(s) {unknown}; known sections: {known}."
    guesses = [
        prefix + close[0] + (f" for {prefix}{key}" if len(unknown) > 1 else "")
        for key in unknown
        if (close := difflib.get_close_matches(key, known, n=1))
    ]
    return message + (f" Did you mean {', '.join(guesses)}?" if guesses else "")


def build_section(cls: type, section: str, values: dict[str, Any]):
    """A config dataclass from a dict of one section: unknown keys and wrong types are ConfigErrors
    naming `section.key`; nested dataclass fields are built from nested dicts."""
    hints = typing.get_type_hints(cls)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = set(values) - known
    require(not unknown, unknown_keys_message(section, unknown, known))
    kwargs = {}
    for key, value in values.items():
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            require(isinstance(value, dict), f"{section}.{key} must be a section (a dict of keys).")
            kwargs[key] = build_section(expected, f"{section}.{key}", value)
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        require(
            ok, f"{section}.{key}={value!r} has type {type(value).__name__}; expected {expected.__name__}."
        )
        kwargs[key] = value
    return cls(**kwargs)


def build_run(cls: type, config: ml_collections.ConfigDict | dict):
    """A run config (a dataclass with one section per field) from a ConfigDict or dict: unknown
    sections, unknown keys and wrong types are ConfigErrors; missing sections take their defaults."""
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    sections = typing.get_type_hints(cls)
    unknown = set(raw) - set(sections)
    require(not unknown, unknown_keys_message("", unknown, sections))
    return cls(
        **{name: build_section(section, name, dict(raw.get(name, {}))) for name, section in sections.items()}
    )


def from_config_dict(config: ml_collections.ConfigDict | dict) -> RunConfig:
    """The one boundary from a (user-edited) ConfigDict to typed, validated configs. With model.hf_path
    set, the architecture comes from that directory's config.json (see `with_hf_architecture`)."""
    return build_run(RunConfig, with_hf_architecture(config))


def with_hf_architecture(config: ml_collections.ConfigDict | Mapping) -> dict:
    """`config` as a dict whose model section, when model.hf_path names a Hugging Face checkpoint, has the
    architecture fields its config.json implies (jaxpar.interop.hf_config.model_fields) in place of the
    preset's; how the model runs (dtypes, attention_impl, remat, sequence parallel variant, max_seq_len)
    stays the run's; data.tokenizer defaults to the checkpoint's tokenizer.json. An unsupported checkpoint is
    one ConfigError naming its field."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    model = dict(tree.get("model") or {})
    if not model.get("hf_path"):
        return tree
    try:
        fields = hf_config.model_fields(hf_config.read_config(model["hf_path"]), where=model["hf_path"])
    except hf_config.HFConfigError as error:
        raise ConfigError(str(error)) from None
    moe = fields.pop("moe")
    tree = tree | {"model": model | fields | {"moe": dict(model.get("moe") or {}) | moe}}
    data = dict(tree.get("data") or {})
    if not data.get("tokenizer") and os.path.isfile(os.path.join(model["hf_path"], "tokenizer.json")):
        tree["data"] = data | {"tokenizer": model["hf_path"]}  # the checkpoint's own tokenizer by default
    return tree


def check_override_keys(config: ml_collections.ConfigDict | Mapping, keys: Iterable[str]) -> None:
    """Each dotted key (an override's `a.b.c`) must name an entry of `config`: the first that does not
    is a ConfigError with `build_section`'s message and a did-you-mean, as from_config_dict would say."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    for key in keys:
        node, parts = tree, key.split(".")
        for depth, part in enumerate(parts):
            section = ".".join(parts[:depth])
            require(
                isinstance(node, Mapping),
                f"{section}={node!r} is a value, not a section: --config.{key} cannot set it; write "
                f"--config.{section}=VALUE.",
            )
            require(part in node, unknown_keys_message(section, [part], node))
            node = node[part]


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value absl would give `--flag` in argv (`--flag=V` or `--flag V`, the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        name, sep, rest = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == flag:
            value = rest if sep else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def check_overrides(argv: Sequence[str], flag: str = "config", default: str | None = None) -> None:
    """Checks the key of every `--config.a.b=VALUE` in argv against the config file `--config=FILE:ARG`
    (loaded as ml_collections.config_flags loads it: FILE's get_config(ARG)); call it before absl parses
    the flags, which meets a misspelled key with a long traceback. A misspelled key, an unloadable file or
    preset is a one-line ConfigError; values are left to the flag parser and from_config_dict."""
    from absl import flags  # config_flags reads flag files the same way

    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
    keys = []
    for arg in argv:
        if arg == "--":
            break
        name = arg.lstrip("-").partition("=")[0]
        for prefix in (f"{flag}.", f"no{flag}."):  # --noconfig.model.tie_embeddings sets a bool
            if arg.startswith("-") and name.startswith(prefix):
                keys.append(name[len(prefix) :])
    spec = _flag_value(argv, flag) or default
    if not spec:
        return  # absl reports a missing required flag
    path, sep, arg = spec.partition(":")
    require(
        os.path.isfile(path), f"--{flag}={spec}: no such file {path!r}; e.g. --{flag}=configs/lm.py:smoke."
    )
    module_spec = importlib.util.spec_from_file_location(f"{flag}_overrides_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # a broken config file keeps its traceback
    try:
        config = module.get_config(arg) if sep else module.get_config()
    except (ValueError, KeyError) as error:  # an unknown preset
        raise ConfigError(f"--{flag}={spec}: {error}") from None
    check_override_keys(config, keys)


def config_dict(run) -> ml_collections.ConfigDict:
    """A run config as the ConfigDict a config file returns: presets start from the dataclass defaults
    (`config_dict(RunConfig())`), the one source of defaults, and state only what differs."""
    return ml_collections.ConfigDict(to_dict(run))


def to_dict(run) -> dict[str, dict[str, Any]]:
    """A run config (RunConfig, or jaxpar.rl's MARLRunConfig) as plain dicts, as config.json holds it."""
    return dataclasses.asdict(run)


def _check_sequence_parallel(model: ModelConfig, train: TrainConfig, sizes: dict[str, int]) -> None:
    """mesh.sequence > 1: the residual stream splits over sequence x tensor, and attention's split
    (jaxpar.parallel.sequence.check_split: the layout's chunks, Ulysses' heads) must work."""
    sequence, tensor = sizes["sequence"], sizes["tensor"]
    if sequence == 1:
        return
    require(
        train.seq_len % (sequence * tensor) == 0,
        f"train.seq_len={train.seq_len} is not divisible by mesh.sequence*mesh.tensor={sequence * tensor}; "
        "the residual stream is split over both.",
    )
    if model.mixer == "linear":  # LASP-2 has no head constraint and no zigzag
        return
    variant, heads, kv_heads = model.sequence_parallel, model.n_heads // tensor, model.n_kv_heads // tensor
    degree = model.ulysses_degree
    if variant == "usp":
        degree = sequence_lib.resolve_ulysses_degree(degree, sequence, heads, kv_heads)
    try:
        sequence_lib.check_split(
            variant, sequence, train.seq_len, heads, kv_heads, degree, model.zigzag_factor(sizes)
        )
    except ValueError as error:
        raise ConfigError(
            f"model.sequence_parallel={variant!r} on mesh.sequence={sequence} "
            f"(train.seq_len={train.seq_len}, "
            f"model.n_heads={model.n_heads}, model.n_kv_heads={model.n_kv_heads}, mesh.tensor={tensor}, "
            f"model.ulysses_degree={model.ulysses_degree}): {error}"
        ) from None


def batch_split(sizes: Mapping[str, int]) -> tuple[int, str]:
    """How many ways a batch is split on a mesh of these axis sizes (the rules' "batch" axes), and those
    axes as config keys ("mesh.data*mesh.fsdp*mesh.expert") for error messages."""
    axes = mesh_axes("batch")
    return math.prod(sizes[a] for a in axes), "*".join(f"mesh.{a}" for a in axes)


def validate_run(run: RunConfig, num_devices: int) -> dict[str, int]:
    """Checks that need the device count or span sections. Returns the resolved mesh axis sizes."""
    sizes = run.mesh.resolve(num_devices)
    model, train = run.model, run.train
    batch_shards, batch_keys = batch_split(sizes)
    micro_batch = train.global_batch // train.grad_accum_steps
    require(
        micro_batch % batch_shards == 0,
        f"train.global_batch={train.global_batch} (per accumulation step {micro_batch}) is not divisible by "
        f"{batch_keys}={batch_shards}; pick a global batch that is a multiple of "
        f"{batch_shards * train.grad_accum_steps}.",
    )
    if sizes["expert"] > 1:
        require(
            model.moe.experts > 0 and model.moe.experts % sizes["expert"] == 0,
            f"mesh.expert={sizes['expert']} needs model.moe.experts to be a positive multiple of it "
            f"(got {model.moe.experts}); set model.moe.experts or mesh.expert=1.",
        )
    if sizes["pipeline"] > 1:
        require(
            not (model.moe.experts and model.moe.mixed),
            f"mesh.pipeline={sizes['pipeline']} with model.moe.first_dense={model.moe.first_dense} / "
            f"model.moe.every={model.moe.every}: pipeline stages split identical layers; use mesh.pipeline=1 "
            "with a mix of dense and MoE layers.",
        )
        run.pipeline.validate(model, sizes, train.global_batch)
        require(
            not run.offload.params,
            f"offload.params=True with mesh.pipeline={sizes['pipeline']}: the pipeline executor runs its "
            "stages' layers itself and does not fetch host-resident parameters; use mesh.pipeline=1 (fsdp "
            "shards the parameters instead) or offload.params=False.",
        )
        require(
            train.grad_accum_steps == 1,
            f"train.grad_accum_steps={train.grad_accum_steps} with mesh.pipeline={sizes['pipeline']}: the "
            "pipeline's microbatches are the accumulation; set pipeline.microbatches instead.",
        )
    require(
        not run.offload.params or model.remat != "none",
        "offload.params=True with model.remat='none': without rematerialisation the backward keeps every "
        "layer's fetched weights on the device as residuals, which is what offloading avoids; set "
        "model.remat='full', 'save_dots' or 'offload'.",
    )
    if model.medusa_heads:  # Medusa-1: only the heads train, on a base loaded from elsewhere
        require(
            bool(train.init_from) and not model.hf_path,
            f"model.medusa_heads={model.medusa_heads} trains the heads on a frozen base model: set "
            "train.init_from=BASE_WORKDIR (a training run of the same model.* settings) and leave "
            "model.hf_path empty (Hugging Face bases are not wired to heads training yet); a randomly "
            "initialised base would stay random.",
        )
        require(
            sizes["pipeline"] == 1,
            f"model.medusa_heads={model.medusa_heads} with mesh.pipeline={sizes['pipeline']}: the "
            "pipelined loss has no Medusa heads; train the heads with mesh.pipeline=1.",
        )
    tensor = sizes["tensor"]
    for name in ("n_heads", "n_kv_heads", "d_ff", "vocab_size"):
        value = getattr(model, name)
        require(
            value % tensor == 0,
            f"model.{name}={value} is not divisible by mesh.tensor={tensor}; tensor parallelism splits it "
            f"evenly. Choose mesh.tensor from the divisors of {value}.",
        )
    require(
        train.seq_len % tensor == 0,
        f"train.seq_len={train.seq_len} is not divisible by mesh.tensor={tensor}; sequence-parallel "
        "activations split the sequence across the tensor axis.",
    )
    _check_sequence_parallel(model, train, sizes)
    require(
        train.seq_len <= model.max_seq_len,
        f"train.seq_len={train.seq_len} exceeds model.max_seq_len={model.max_seq_len}.",
    )
    require(
        model.d_model % sizes["fsdp"] == 0,
        f"model.d_model={model.d_model} is not divisible by mesh.fsdp={sizes['fsdp']}; FSDP shards the "
        "embedding dimension of every weight.",
    )
    warmup = run.optimizer.warmup_steps
    if warmup > 10 * (train.steps - 1):  # step s trains with the schedule at s - 1: step 1 with lr 0
        raise ConfigError(
            f"optimizer.warmup_steps={warmup} with train.steps={train.steps}: the learning rate ramps up "
            f"from 0 over {warmup} steps, so this run would never train with more than "
            f"{(train.steps - 1) / warmup:.0%} of optimizer.learning_rate={run.optimizer.learning_rate}; "
            f"lower optimizer.warmup_steps (e.g. to {train.steps // 10}) or raise train.steps."
        )
    if warmup >= train.steps:  # trains, slowly: a warning, not a refusal
        logging.warning(
            "optimizer.warmup_steps=%d with train.steps=%d: the learning rate ramps up for the whole run, "
            "reaching at most %.0f%% of optimizer.learning_rate, and the cosine decay never starts.",
            warmup,
            train.steps,
            100 * (train.steps - 1) / warmup,
        )
    if run.data.source in ("stdlib", "text") and run.data.tokenizer in ("", "bytes"):
        hf = (
            f" (from model.hf_path={model.hf_path!r}, whose tokenizer.json is missing)"
            if model.hf_path
            else ""
        )
        require(
            model.vocab_size >= 256,
            f"model.vocab_size={model.vocab_size}{hf} is too small for byte tokens; use at least 256 or set "
            "data.tokenizer.",
        )
    return sizes
