"""A model ready to generate: its config, its parameters placed on a mesh, its tokenizer.

`load_workdir` reads a training run (config.json and the newest, checksum-verified checkpoint, or
`step`) onto any mesh: the checkpoint is resharded on restore, so a run trained with FSDP can be served
with tensor parallelism. `from_params` wraps parameters already in memory (tests, a fresh init).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxpar.config import ConfigError, ModelConfig, RunConfig, from_config_dict
from jaxpar.infer.text import ByteTokenizer
from jaxpar.parallel.mesh import make_mesh
from jaxpar.train import build as build_lib, optimizer as optimizer_lib
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


def read_run_config(workdir: str) -> RunConfig:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"{path} does not exist: --workdir must be the folder of a training run "
            "(experiments/train_lm.py --workdir=...)."
        )
    with open(path) as f:
        raw = json.load(f)
    raw.pop("resolved_mesh", None)
    return from_config_dict(raw)


def load_workdir(workdir: str, mesh: Mesh, step: int | None = None) -> LoadedModel:
    """The parameters of a training run's checkpoint (newest intact, or `step`) placed on `mesh`."""
    run = read_run_config(workdir)
    tx = optimizer_lib.make_optimizer(run.optimizer, run.train.steps)
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
    return LoadedModel(cfg, graphdef, state.params, mesh, tokenizer_for(run), name)


def tokenizer_for(run: RunConfig):
    """The tokenizer a run trained with: bytes for the stdlib and text corpora; None (ids only) for a
    pre-tokenized corpus."""
    return ByteTokenizer() if run.data.source in BYTE_SOURCES else None
