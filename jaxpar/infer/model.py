"""A model ready to generate: its config, its parameters placed on a mesh, its tokenizer.

`load_workdir` reads a training run (config.json and the newest, checksum-verified checkpoint, or
`step`) onto any mesh: the checkpoint is resharded on restore, so a run trained with FSDP can be served
with tensor parallelism. `from_params` wraps parameters already in memory (tests, a fresh init).
"""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxpar.config import ConfigError, ModelConfig, RunConfig, from_config_dict
from jaxpar.data.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer
from jaxpar.parallel.mesh import make_mesh
from jaxpar.train import (
    build as build_lib,
    data as data_lib,
    optimizer as optimizer_lib,
    workdir as workdir_lib,
)
from jaxpar.train.checkpoint import Checkpointer, CheckpointError

BYTE_SOURCES = ("stdlib", "text")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    cfg: ModelConfig  # as it runs for inference: MoE layers dropless (see `inference_config`)
    graphdef: nnx.GraphDef
    params: nnx.State
    mesh: Mesh
    tokenizer: object | None  # encode/decode (jaxpar.infer.text); None: token ids only
    name: str = "jaxpar"
    stop_token_ids: tuple[int, ...] = ()


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """The model as it generates: MoE layers dropless (capacity_factor 0), since a capacity computed from
    the tokens of one call would drop different tokens in a prefill than in a full forward. The
    parameters are the same."""
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=0.0))


def inference_mesh(sizes: dict[str, int] | None = None) -> Mesh:
    """A mesh over the first data x tensor (x ...) devices; default: one device."""
    sizes = {"pipeline": 1, "data": 1, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1, **(sizes or {})}
    need = 1
    for size in sizes.values():
        need *= size
    if need > jax.device_count():
        raise ConfigError(
            f"the inference mesh {sizes} needs {need} devices; this process has {jax.device_count()}. "
            "Use smaller --mesh sizes."
        )
    return make_mesh(sizes, devices=jax.devices()[:need])


def from_params(
    cfg: ModelConfig, params: nnx.State, mesh: Mesh, tokenizer=None, name="jaxpar"
) -> LoadedModel:
    """Places `params` (a Transformer's nnx.State for `cfg`) on `mesh` by the rules table."""
    cfg = inference_config(cfg)
    graphdef, _, shardings = build_lib.param_shardings(cfg, mesh)
    return LoadedModel(cfg, graphdef, jax.device_put(params, shardings), mesh, tokenizer, name)


def load_workdir(workdir: str, mesh: Mesh, step: int | None = None) -> LoadedModel:
    """The parameters of a training run's checkpoint (newest intact, or `step`) placed on `mesh`."""
    run = workdir_lib.read_run_config(workdir)
    tx = optimizer_lib.for_run(run)
    _, abstract, _ = build_lib.abstract_state(run.model, tx, mesh)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=run.train.keep_checkpoints)
    try:
        if step is None:
            restored = checkpointer.restore_latest(abstract, on_corrupt="stop")
            if restored is None:
                raise CheckpointError(
                    f"{workdir} has no checkpoint yet; train it first (train.checkpoint_every, or let "
                    "the run end)."
                )
            step, state = restored[:2]
        else:
            state = checkpointer.restore(step, abstract)[0]
    finally:
        checkpointer.close()
    cfg = inference_config(run.model)
    graphdef, _ = build_lib.abstract_model(cfg)
    name = f"{os.path.basename(os.path.normpath(workdir))}@{step}"
    tokenizer = tokenizer_for(run, workdir)
    stop = getattr(tokenizer, "stop_token_ids", ())
    return LoadedModel(cfg, graphdef, state.params, mesh, tokenizer, name, stop_token_ids=stop)


def load_hf(directory: str, mesh: Mesh) -> LoadedModel:
    """A Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json) placed on `mesh`,
    each device reading only its own shards; token ids only when the directory has no tokenizer."""
    run = from_config_dict({"model": {"hf_path": directory}})
    cfg = inference_config(run.model)
    graphdef, _ = build_lib.abstract_model(cfg)
    params = build_lib.load_hf_params(cfg, mesh)
    tokenizer = tokenizer_for(run) if run.data.tokenizer else None
    stop = getattr(tokenizer, "stop_token_ids", ())
    name = os.path.basename(os.path.normpath(directory))
    return LoadedModel(cfg, graphdef, params, mesh, tokenizer, name, stop_token_ids=stop)


def load(workdir: str | None, hf_path: str | None, mesh: Mesh, step: int | None = None) -> LoadedModel:
    """A training run (`workdir`, at `step` or its newest checkpoint) or a Hugging Face directory: exactly
    one of the two."""
    if (workdir is None) == (hf_path is None):
        raise ConfigError(
            "give exactly one of --workdir (a jaxpar run) and --hf_path (a Hugging Face directory)"
        )
    return load_workdir(workdir, mesh, step) if workdir is not None else load_hf(hf_path, mesh)


def tokenizer_for(run: RunConfig, workdir: str | None = None):
    """The tokenizer a run trained with: the one it recorded in `workdir` (its hash checked); else
    data.tokenizer's; else bytes for the stdlib and text corpora and None (ids only) for a pre-tokenized
    corpus."""
    recorded = None if workdir is None else data_lib.workdir_tokenizer(workdir)
    if recorded is not None:
        return recorded
    if run.data.tokenizer:
        try:
            return load_tokenizer(run.data.tokenizer)
        except TokenizerError as error:
            raise ConfigError(
                f"the run's data.tokenizer={run.data.tokenizer!r} cannot be loaded here: {error}"
            ) from None
    return ByteTokenizer() if run.data.source in BYTE_SOURCES else None
