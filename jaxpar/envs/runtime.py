"""A batch of environments on the mesh's data axes, stepped by one jitted program.

The batch axis of every array (observations, state, actions, rewards, flags) is the logical axis "batch"
of `jaxpar.parallel.rules`, the same one the models' activations use, so an RL loop's env batch and its
policy batch live on the same devices. Env i's keys are fold_in(key, i) (see `wrappers.env_keys`) and
nothing couples envs, so env i's trajectory is the same on 1 device or 8.

    mesh = make_mesh({"data": jax.device_count()})
    runtime = EnvRuntime(make("simple_spread_v3"), num_envs=1024, mesh=mesh)
    obs, state = runtime.reset(key)
    obs, state, reward, terminated, truncated, info = runtime.step(key, state, actions)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpar.envs.core import MultiAgentEnv
from jaxpar.envs.wrappers import VecEnv
from jaxpar.parallel.rules import logical_to_spec, mesh_axes

Policy = Callable[[jax.Array, jax.Array], jax.Array]  # (key, obs [B, A, D]) -> actions [B, A, ...]


def batch_shards(mesh: Mesh) -> int:
    """How many ways the logical "batch" axis is split on this mesh."""
    return math.prod(mesh.shape[a] for a in mesh_axes("batch"))


class EnvRuntime:
    """`VecEnv(env, num_envs, autoreset)` jitted with every batched array sharded over the "batch" axes."""

    def __init__(self, env: MultiAgentEnv, num_envs: int, mesh: Mesh, autoreset: bool = True):
        shards = batch_shards(mesh)
        if num_envs % shards:
            raise ValueError(
                f"num_envs={num_envs} cannot be split evenly over the {shards} batch shards of mesh "
                f"{dict(mesh.shape)}; use a multiple of {shards}."
            )
        self.env = env
        self.num_envs = num_envs
        self.mesh = mesh
        self.vec = VecEnv(env, num_envs, autoreset=autoreset)
        self.replicated = NamedSharding(mesh, P())
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
        reset_out = jax.eval_shape(self.vec.reset, key)
        actions = jax.ShapeDtypeStruct(self.vec.action_space.shape, self.vec.action_space.dtype)
        step_out = jax.eval_shape(self.vec.step, key, reset_out[1], actions)
        self.obs_sharding = self.batch_sharding(reset_out[0])
        self.state_sharding = self.batch_sharding(reset_out[1])
        self.action_sharding = self.batch_sharding(actions)
        self.reset = jax.jit(
            self.vec.reset, in_shardings=self.replicated, out_shardings=self.batch_sharding(reset_out)
        )
        self.step = jax.jit(
            self.vec.step,
            in_shardings=(self.replicated, self.state_sharding, self.action_sharding),
            out_shardings=self.batch_sharding(step_out),
        )

    def batch_sharding(self, tree):
        """NamedShardings putting axis 0 of every leaf on the "batch" mesh axes."""
        return jax.tree.map(
            lambda x: NamedSharding(self.mesh, logical_to_spec(("batch",) + (None,) * (len(x.shape) - 1))),
            tree,
        )

    def place(self, tree):
        """Put host arrays with a leading [num_envs] axis (e.g. actions) on the batch shards."""
        return jax.device_put(tree, self.batch_sharding(tree))

    def random_policy(self) -> Policy:
        space = self.vec.action_space
        return lambda key, obs: space.sample(key)

    def rollout_fn(self, num_steps: int, policy: Policy | None = None, collect=None):
        """A jitted `(key, obs, state) -> ((obs, state), collected)` running `num_steps` steps in one scan.

        `policy(key, obs)` picks the actions (uniform random by default). `collect(obs, reward, terminated,
        truncated, info)` says what to keep per step, stacked on a leading time axis; by default a
        checksum of observations and rewards only, so nothing is dead code and nothing big is kept."""
        policy = policy or self.random_policy()
        if collect is None:

            def collect(obs, reward, terminated, truncated, info):
                return jnp.sum(obs) + jnp.sum(reward)

        def run(key, obs, state):
            def body(carry, step_key):
                obs, state = carry
                k_act, k_env = jax.random.split(step_key)
                actions = jax.lax.with_sharding_constraint(policy(k_act, obs), self.action_sharding)
                obs, state, reward, terminated, truncated, info = self.vec.step(k_env, state, actions)
                return (obs, state), collect(obs, reward, terminated, truncated, info)

            return jax.lax.scan(body, (obs, state), jax.random.split(key, num_steps))

        return jax.jit(run, in_shardings=(self.replicated, self.obs_sharding, self.state_sharding))
