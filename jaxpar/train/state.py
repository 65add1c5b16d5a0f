"""Train state and its creation directly in sharded form (never whole on one device)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpar.config import ModelConfig, OptimizerConfig
from jaxpar.models.llama import Transformer
from jaxpar.parallel import rules


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def _decay_mask(params):
    """Weight decay on weights only, not on norm scales or the router's selection bias."""
    return jax.tree.map_with_path(
        lambda path, _: not any(name in jax.tree_util.keystr(path) for name in ("scale", "router_bias")), params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=_decay_mask,
        ),
    )


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


def _keys(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(mesh: Mesh, abstract_state: TrainState, param_shardings) -> TrainState:
    """Optimizer moments follow the parameter they belong to (matched by path suffix and shape), which
    is what makes FSDP ZeRO-3: parameters, gradients and optimizer state all sharded alike. Everything
    else (step, counts) is replicated."""
    by_path = {
        _keys(path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(abstract_state.params)[0], jax.tree.leaves(param_shardings)
        )
    }
    replicated = NamedSharding(mesh, P())

    def match(path, leaf):
        keys = _keys(path)
        for start in range(len(keys)):
            shape_and_sharding = by_path.get(keys[start:])
            if shape_and_sharding and shape_and_sharding[0] == leaf.shape:
                return shape_and_sharding[1]
        return replicated

    return jax.tree.map_with_path(match, abstract_state)


def abstract_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh):
    """(graphdef, abstract state with shardings attached, shardings), all from `jax.eval_shape`: used to
    create the state, restore checkpoints onto any mesh, and compile ahead of time."""
    graphdef, abstract_params = abstract_model(model_cfg)
    param_shardings = rules.tree_shardings(mesh, abstract_params, rules.param_specs(abstract_params))
    rules.check_sharded(mesh, abstract_params, param_shardings)
    shapes = jax.eval_shape(_init_fn(model_cfg, tx), jax.random.key(0))
    shardings = state_shardings(mesh, shapes, param_shardings)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return graphdef, abstract, shardings


def init_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int):
    """(graphdef, state, shardings). The jitted init writes every array straight into its shards, so no
    device ever holds the whole model."""
    graphdef, _, shardings = abstract_state(model_cfg, tx, mesh)
    return graphdef, init_sharded(model_cfg, tx, mesh, shardings, seed), shardings


def init_sharded(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, shardings, seed: int):
    """The initial TrainState, created by one jitted init directly into `shardings`."""
    with jax.set_mesh(mesh):
        return jax.jit(_init_fn(model_cfg, tx), out_shardings=shardings)(jax.random.key(seed))
