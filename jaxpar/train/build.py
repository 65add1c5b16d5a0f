"""One builder for the LM training program. The training loop, the compile-ahead analysis, the tests and
the benchmarks all run the program `build` returns, so what is measured is what trains.

The state is created directly in sharded form: abstract shapes from `jax.eval_shape`, shardings from the
logical rules, then one jitted init that writes every array straight into its shards (no device ever
holds the whole model).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxpar.config import ConfigError, ModelConfig, RunConfig
from jaxpar.interop import hf_weights
from jaxpar.models import medusa
from jaxpar.models.llama import Transformer
from jaxpar.parallel import rules
from jaxpar.train import fit, offload, optimizer as optimizer_lib, step as step_lib, workdir as workdir_lib
from jaxpar.train.checkpoint import Checkpointer
from jaxpar.train.pipeline import make_pipelined_loss_and_grads
from jaxpar.train.state import TrainState, state_shardings, with_shardings


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def _init_fn(model_cfg: ModelConfig, tx: optax.GradientTransformation):
    def init(key):
        with nnx.use_eager_sharding(False):
            model = Transformer(model_cfg, rngs=nnx.Rngs(key))
        params = nnx.state(model)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def param_shardings(model_cfg: ModelConfig, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, abstract parameters, their NamedShardings on `mesh` by the rules table)."""
    graphdef, abstract_params = abstract_model(model_cfg)
    shardings = rules.tree_shardings(mesh, abstract_params, rules.param_specs(abstract_params))
    rules.check_sharded(mesh, abstract_params, shardings)
    return graphdef, abstract_params, shardings


def abstract_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh):
    """(graphdef, abstract state with shardings attached, shardings), all from `jax.eval_shape`: used to
    create the state, restore checkpoints onto any mesh, and compile ahead of time."""
    graphdef, abstract_params, placed = param_shardings(model_cfg, mesh)
    shapes = jax.eval_shape(_init_fn(model_cfg, tx), jax.random.key(0))
    shardings = state_shardings(mesh, shapes, placed)
    return graphdef, with_shardings(shapes, shardings), shardings


def init_sharded(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, shardings, seed: int):
    """The initial TrainState, created by one jitted init directly into `shardings`."""
    with jax.set_mesh(mesh):
        return jax.jit(_init_fn(model_cfg, tx), out_shardings=shardings)(jax.random.key(seed))


def load_hf_params(model_cfg: ModelConfig, mesh: Mesh) -> nnx.State:
    """The parameters of the Hugging Face checkpoint at model_cfg.hf_path, placed on `mesh` by the rules
    table, each device reading only its own shards."""
    _, abstract, shardings = param_shardings(model_cfg, mesh)
    params = hf_weights.load_params(
        model_cfg.hf_path, model_cfg, nnx.to_pure_dict(with_shardings(abstract, shardings))
    )
    nnx.replace_by_pure_dict(abstract, params)
    return abstract


def state_from_params(
    params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh, shardings
) -> TrainState:
    """A TrainState at step 0 with these parameters and a fresh optimizer state, placed by `shardings`."""

    def init(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)(params)


def init_from_hf(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, shardings):
    """The initial TrainState with the Hugging Face checkpoint's parameters and a fresh optimizer state."""
    return state_from_params(load_hf_params(model_cfg, mesh), tx, mesh, shardings)


def init_from_run(run: RunConfig, tx: optax.GradientTransformation, mesh: Mesh, shardings) -> TrainState:
    """The initial TrainState of `run` with the parameters of the newest checkpoint of the training run
    in run.train.init_from (restored onto `mesh`), a fresh optimizer state, step 0. Parameters the base
    lacks (Medusa heads: the same model plus a "medusa" subtree) keep their initial values; every base
    parameter must exist here with the same shape, else a ConfigError names the difference."""
    base_dir = run.train.init_from
    base = workdir_lib.read_run_config(base_dir, flag="train.init_from")
    ours = dataclasses.replace(run.model, medusa_heads=0)
    theirs = dataclasses.replace(base.model, medusa_heads=0)
    if jax.tree.map(lambda x: (x.shape, x.dtype), abstract_model(ours)[1]) != jax.tree.map(
        lambda x: (x.shape, x.dtype), abstract_model(theirs)[1]
    ):
        differ = [
            f"model.{f.name}: base {getattr(theirs, f.name)!r}, here {getattr(ours, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if getattr(theirs, f.name) != getattr(ours, f.name)
        ]
        raise ConfigError(
            f"train.init_from={base_dir!r} holds a model of other parameter shapes ({'; '.join(differ)}); "
            "use the base run's model settings (its config.json)."
        )
    _, base_abstract, _ = abstract_state(base.model, optimizer_lib.for_run(base), mesh)
    checkpointer = Checkpointer(os.path.join(base_dir, "checkpoints"), keep=base.train.keep_checkpoints)
    try:
        restored = checkpointer.restore_latest(base_abstract, on_corrupt="stop")
    finally:
        checkpointer.close()
    if restored is None:
        raise ConfigError(f"train.init_from={base_dir!r} has no checkpoint yet; train the base run first.")
    fresh = init_sharded(run.model, tx, mesh, shardings, run.train.seed).params
    params = nnx.to_pure_dict(fresh) | {
        name: value
        for name, value in nnx.to_pure_dict(restored[1].params).items()
        if name != medusa.PARAM_NAME
    }
    nnx.replace_by_pure_dict(fresh, params)
    return state_from_params(fresh, tx, mesh, shardings)


def init_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int):
    """(graphdef, state, shardings)."""
    graphdef, _, shardings = abstract_state(model_cfg, tx, mesh)
    return graphdef, init_sharded(model_cfg, tx, mesh, shardings, seed), shardings


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """A run's jitted steps on its mesh, and the state they take."""

    run: RunConfig
    mesh: Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    abstract: TrainState  # ShapeDtypeStructs carrying their shardings
    shardings: TrainState
    train_step: Callable  # (state, batch) -> (state, metrics), jitted, donates the state
    eval_step: Callable  # (params, batch) -> (summed cross-entropy, token count), jitted

    def check_fits(self, bytes_limit: int | None = None) -> dict[str, int]:
        """Refuses (ConfigError naming the numbers) a run whose state and activations cannot fit the
        memory of this mesh's devices; call it before `init`. `compile` does not: any size compiles."""
        return fit.check_fits(self.run, self.mesh, self.abstract, bytes_limit)

    def init(self) -> TrainState:
        """The state at step 0: random parameters, or with train.init_from a base run's (see
        `init_from_run`), or with model.hf_path the checkpoint's, each device
        reading only its own shards (jaxpar.interop.hf_weights)."""
        if self.run.train.init_from:
            return init_from_run(self.run, self.tx, self.mesh, self.shardings)
        if self.run.model.hf_path:
            return init_from_hf(self.run.model, self.tx, self.mesh, self.shardings)
        return init_sharded(self.run.model, self.tx, self.mesh, self.shardings, self.run.train.seed)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (self.run.train.global_batch, self.run.train.seq_len)
        sharding = step_lib.batch_sharding(self.mesh)
        return {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for key in step_lib.BATCH_KEYS}

    def compile(self):
        """The compiled train step, from abstract inputs only: nothing is allocated, so any model size
        compiles for any mesh of this process."""
        with jax.set_mesh(self.mesh):
            return self.train_step.lower(self.abstract, self.abstract_batch()).compile()


def build(run: RunConfig, mesh: Mesh) -> TrainProgram:
    """The train and eval steps of `run` on `mesh`: the optimizer and its schedule, the pipelined loss when
    the mesh has pipeline stages, the MoE router's bias balancing when configured."""
    cfg, steps = run.model, run.train.steps
    tx = optimizer_lib.for_run(run)  # with Medusa heads: the heads only
    graphdef, abstract, shardings = abstract_state(cfg, tx, mesh)
    device_params, device_opt_state, host_params = shardings.params, None, None
    if run.offload.optimizer_state:  # stored in pinned host memory, copied in for the update
        device_opt_state = shardings.opt_state
        shardings = offload.host_optimizer_state(shardings)
    if run.offload.params:  # stored in pinned host memory, fetched layer by layer
        host_params = offload.HostParams.of(abstract.params, device_params)
        shardings = offload.host_params(shardings)
    abstract = with_shardings(abstract, shardings)
    pipelined = mesh.shape["pipeline"] > 1
    bias_rate = cfg.moe.bias_update_rate if cfg.moe.experts and cfg.moe.balance == "bias" else 0.0
    train_step = step_lib.make_train_step(
        graphdef,
        tx,
        optimizer_lib.learning_rate_schedule(run.optimizer, steps),
        run.train.grad_accum_steps,
        device_params,
        router_bias_rate=bias_rate,
        loss_and_grads_fn=make_pipelined_loss_and_grads(mesh, run.pipeline) if pipelined else None,
        offloaded_opt_state=device_opt_state,
        host_params=host_params,
    )
    return TrainProgram(
        run=run,
        mesh=mesh,
        graphdef=graphdef,
        tx=tx,
        abstract=abstract,
        shardings=shardings,
        train_step=step_lib.jit_train_step(train_step, mesh, shardings),
        eval_step=step_lib.jit_eval_step(step_lib.make_eval_step(graphdef, host_params), mesh, shardings),
    )
