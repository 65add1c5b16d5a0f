"""Typed, frozen run configuration, built from an ml_collections ConfigDict at one boundary.

Every check of a configuration lives here, so that a bad value fails with one clear message before
anything is traced or compiled. `from_config_dict` is the boundary: it rejects unknown keys and wrong
types, then each dataclass validates itself in `__post_init__`; checks that need the device count
(the mesh) or several sections together run in `validate_run`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from jaxpar.kernels import attention as attention_lib
from jaxpar.parallel import sequence as sequence_lib
from jaxpar.parallel.mesh import MESH_AXES
from jaxpar.parallel.rules import mesh_axes
from jaxpar.parallel.schedules import SCHEDULES, Schedule, ScheduleError, cached_schedule

# Token mixers: softmax attention, linear attention (LASP-2 when sequence-parallel), or both interleaved.
MIXERS = ("softmax", "linear", "hybrid")
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

    def __post_init__(self):
        require(self.experts >= 0, f"model.moe.experts={self.experts} must be >= 0 (0 = dense MLPs).")
        if self.experts:
            require(
                1 <= self.top_k <= self.experts,
                f"model.moe.top_k={self.top_k} must be between 1 and model.moe.experts={self.experts}.",
            )
        require(self.d_ff > 0, f"model.moe.d_ff={self.d_ff} must be positive.")
        require(self.shared_experts >= 0, f"model.moe.shared_experts={self.shared_experts} must be >= 0.")
        one_of("model.moe.router", self.router, ("softmax", "sigmoid"))
        one_of("model.moe.balance", self.balance, ("aux_loss", "bias"))
        require(
            self.capacity_factor >= 0,
            f"model.moe.capacity_factor={self.capacity_factor} must be >= 0 (0 = dropless).",
        )


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
    param_dtype: str = "float32"
    dtype: str = "float32"
    init_std: float = 0.02
    sequence_parallel: str = "ring"  # used when mesh.sequence > 1; see jaxpar.parallel.sequence
    ulysses_degree: int = 0  # usp: Ulysses group size inside the sequence axis (0: the largest that fits)
    mixer: str = "softmax"
    softmax_every: int = 4  # hybrid: every softmax_every-th layer is softmax attention, the rest linear
    linear_gate: str = "scalar"  # linear attention: "none" (plain) or "scalar" (gated decay per KV head)
    linear_chunk: int = 64  # linear attention chunk length
    moe: MoEConfig = MoEConfig()

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            require(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive.")
        require(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}; "
            "grouped-query attention needs every KV head to serve the same number of query heads.",
        )
        one_of("model.attention_impl", self.attention_impl, attention_lib.IMPLEMENTATIONS)
        one_of("model.remat", self.remat, ("none", "full", "save_dots"))
        one_of("model.param_dtype", self.param_dtype, ("float32", "bfloat16"))
        one_of("model.dtype", self.dtype, ("float32", "bfloat16"))
        one_of("model.sequence_parallel", self.sequence_parallel, sequence_lib.VARIANTS)
        one_of("model.mixer", self.mixer, MIXERS)
        one_of("model.linear_gate", self.linear_gate, LINEAR_GATES)
        require(
            self.ulysses_degree >= 0, f"model.ulysses_degree={self.ulysses_degree} must be >= 0 (0 = auto)."
        )
        require(self.linear_chunk >= 1, f"model.linear_chunk={self.linear_chunk} must be positive.")
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
        mlp = 3 * self.d_model * self.d_ff
        if self.moe.experts:
            mlp = (
                3 * self.d_model * self.moe.d_ff * (self.moe.experts + self.moe.shared_experts)
                + self.d_model * self.moe.experts
            )
        per_layer = attn + mlp + 2 * self.d_model
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + self.linear_layers * self._linear_extra + embed + self.d_model

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

    def __post_init__(self):
        sizes = self.as_dict()
        for name, size in sizes.items():
            require(
                size == -1 or size >= 1, f"mesh.{name}={size} must be a positive int or -1 (all remaining)."
            )
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
    """Where tokens come from. `stdlib`: the Python standard library's own sources, byte tokens (no
    download). `text`: local text files matched by `path` (a glob), byte tokens. `tokens`: pre-tokenized
    flat binary files matched by `path` (numpy `token_dtype`), memory mapped."""

    source: str = "stdlib"
    path: str = ""
    token_dtype: str = "uint16"
    eval_fraction: float = 0.02
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self):
        one_of("data.source", self.source, ("stdlib", "text", "tokens"))
        one_of("data.token_dtype", self.token_dtype, ("uint16", "uint32"))
        require(0 <= self.seed < 2**32, f"data.seed={self.seed} must be in [0, 2**32).")
        require(0.0 < self.eval_fraction < 1.0, f"data.eval_fraction={self.eval_fraction} must be in (0, 1).")
        require(
            self.source == "stdlib" or self.path,
            f"data.source={self.source!r} needs data.path (a glob of files), e.g. "
            "--config.data.path='/data/*.txt'.",
        )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0

    def __post_init__(self):
        require(self.learning_rate > 0, f"optimizer.learning_rate={self.learning_rate} must be positive.")
        require(0 <= self.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")
        require(self.warmup_steps >= 0, f"optimizer.warmup_steps={self.warmup_steps} must be >= 0.")


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

    def __post_init__(self):
        for name in (
            "steps",
            "global_batch",
            "seq_len",
            "grad_accum_steps",
            "log_every",
            "eval_batches",
            "keep_checkpoints",
        ):
            require(getattr(self, name) >= 1, f"train.{name}={getattr(self, name)} must be >= 1.")
        for name in ("eval_every", "checkpoint_every"):
            require(getattr(self, name) >= 0, f"train.{name}={getattr(self, name)} must be >= 0 (0 = never).")
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

    def __post_init__(self):
        one_of("pipeline.schedule", self.schedule, SCHEDULES)
        require(self.microbatches >= 1, f"pipeline.microbatches={self.microbatches} must be >= 1.")
        require(self.virtual_stages >= 1, f"pipeline.virtual_stages={self.virtual_stages} must be >= 1.")
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


def build_section(cls: type, section: str, values: dict[str, Any]):
    """A config dataclass from a dict of one section: unknown keys and wrong types are ConfigErrors
    naming `section.key`; nested dataclass fields are built from nested dicts."""
    hints = typing.get_type_hints(cls)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    require(
        not unknown,
        f"unknown config key(s) {[f'{section}.{k}' for k in unknown]}; "
        f"known keys of {section}: {sorted(known)}.",
    )
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
    unknown = sorted(set(raw) - set(sections))
    require(not unknown, f"unknown config section(s) {unknown}; known sections: {sorted(sections)}.")
    return cls(
        **{name: build_section(section, name, dict(raw.get(name, {}))) for name, section in sections.items()}
    )


def from_config_dict(config: ml_collections.ConfigDict | dict) -> RunConfig:
    """The one boundary from a (user-edited) ConfigDict to typed, validated configs."""
    return build_run(RunConfig, config)


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
        run.pipeline.validate(model, sizes, train.global_batch)
        require(
            train.grad_accum_steps == 1,
            f"train.grad_accum_steps={train.grad_accum_steps} with mesh.pipeline={sizes['pipeline']}: the "
            "pipeline's microbatches are the accumulation; set pipeline.microbatches instead.",
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
    if run.data.source in ("stdlib", "text"):
        require(
            model.vocab_size >= 256,
            f"model.vocab_size={model.vocab_size} is too small for byte tokens; use at least 256.",
        )
    return sizes
