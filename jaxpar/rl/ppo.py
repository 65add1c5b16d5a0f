"""The PPO learner behind IPPO and MAPPO, purejaxrl style: the whole run is jitted, seeds are vmapped.

One update (per seed): collect `num_steps` transitions of `num_envs` envs (rollout.collect), bootstrap
values of truncated episodes' final observations, GAE, then `update_epochs` passes over the batch in
`num_minibatches` shuffled minibatches (feed-forward: env steps, all agents of a step together;
recurrent: whole env sequences, unrolled from the carry they started with).

Placement follows the LM runtime: every env-batch array ([S, E, ...]) is sharded over the mesh's batch
axes, parameters and optimizer moments ([S, ...]) by the logical names on the network's weights
(replicated on a data-parallel mesh, sharded with fsdp/tensor axes). Shuffles are permutations of global
indices drawn from the seed's key, so a fixed seed gives the same run on 1 device or 8.

With `algo.reward_shaping` on, the rollout adds an annealed bonus from the env's info to the rewards the
learner sees (rollout.collect); episode returns stay the env's own.

Environments that override `legal_actions` (turn-based games such as Hanabi) have illegal actions masked
to a large negative logit when sampling and in the loss; for every other environment nothing changes.

    ppo = PPO(run, env, mesh)
    states = ppo.init(ppo.seed_keys())              # [S, ...] runner states, already sharded
    states, metrics = ppo.run_updates(10)(states)   # 10 updates in one call; metrics [10, S, ...]
    states, metrics = ppo.run_updates(10)(states, 3)  # 3 updates, same program; metrics rows 3.. zero
    states, metrics = ppo.make_train()(ppo.seed_keys())   # the whole run as one jitted function
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpar.envs.core import MultiAgentEnv, Wrapper
from jaxpar.envs.wrappers import EpisodeStats, VecEnv
from jaxpar.parallel import rules
from jaxpar.rl import algorithms, batching, networks
from jaxpar.rl.config import MARLRunConfig
from jaxpar.rl.gae import gae
from jaxpar.rl.losses import ppo_loss
from jaxpar.rl.rollout import (
    RolloutState,
    collect,
    constrain_batch,
    episode_metrics,
    shaping_coefs,
    shaping_metrics,
)
from jaxpar.train.state import TrainState, state_shardings


def has_legal_actions(env) -> bool:
    """True when `env` (or a wrapper inside it) overrides `MultiAgentEnv.legal_actions`."""
    while isinstance(env, Wrapper) and type(env).legal_actions is Wrapper.legal_actions:
        env = env.env
    return type(env).legal_actions is not MultiAgentEnv.legal_actions


@struct.dataclass
class RunnerState:
    train: TrainState  # step (updates done), params, opt_state
    rollout: RolloutState
    key: jax.Array  # uint32 key data (plain arrays checkpoint everywhere; typed keys are wrapped inside)


class PPO:
    def __init__(self, run: MARLRunConfig, env, mesh: Mesh):
        self.run, self.env, self.mesh = run, env, mesh
        self.algo = algorithms.get(run.algo.name, run.network)
        self.vec = EpisodeStats(VecEnv(env, run.env.num_envs))
        self.num_agents = env.num_agents
        self.mask = batching.action_mask(env.action_space)
        self.num_updates = run.num_updates
        obs = jax.ShapeDtypeStruct(env.observation_space.shape, jnp.float32)
        self.actor_dim = jax.eval_shape(self.algo.actor_inputs, obs).shape[-1]
        self.critic_dim = jax.eval_shape(self.algo.critic_inputs, obs).shape[-1]
        self.num_actions = batching.num_logits(env.action_space)
        # Envs with rules: sample and learn only legal actions (the masks travel in the batch).
        self.legal_actions = self.vec.legal_actions if has_legal_actions(env) else None
        with nnx.use_eager_sharding(False):
            abstract_model = nnx.eval_shape(self._model, jax.random.key(0))
        self.graphdef, abstract_params = nnx.split(abstract_model)
        self.param_specs = rules.param_specs(abstract_params)
        self.tx = self._optimizer()
        self.compile_s: dict[int, float] = {}

    # --- model and optimizer ------------------------------------------------------------------------

    def _model(self, key):
        return networks.ActorCritic(
            self.actor_dim, self.critic_dim, self.num_actions, self.run.network, rngs=nnx.Rngs(key)
        )

    def _optimizer(self):
        algo = self.run.algo
        grad_steps_per_update = algo.update_epochs * algo.num_minibatches
        if algo.anneal_lr:

            def lr(count):
                return self._current_lr(count // grad_steps_per_update)
        else:
            lr = algo.lr
        return optax.chain(optax.clip_by_global_norm(algo.max_grad_norm), optax.adam(lr, eps=1e-5))

    def sample(self, key, logits):
        """Actions drawn from the policy's logits (evaluation's "sampled" mode)."""
        return jax.random.categorical(key, logits)

    def policy_step(self, params, carry, obs, reset):
        """(carry, logits [..., A, n], values [..., A]) for observations [..., A, D]."""
        with nnx.use_eager_sharding(False):
            model = nnx.merge(self.graphdef, params)
        reset_A = jnp.broadcast_to(reset[..., None], obs.shape[:-1])
        carry, logits, values = model(
            carry, self.algo.actor_inputs(obs), self.algo.critic_inputs(obs), reset_A
        )
        return carry, batching.masked_logits(logits, self.mask), values

    def value(self, params, carry, obs, reset):
        with nnx.use_eager_sharding(False):
            model = nnx.merge(self.graphdef, params)
        reset_A = jnp.broadcast_to(reset[..., None], obs.shape[:-1])
        return model.value(carry, self.algo.critic_inputs(obs), reset_A)

    # --- one seed -------------------------------------------------------------------------------------

    def init(self, key: jax.Array) -> RunnerState:
        k_params, k_env, k_run = jax.random.split(key, 3)
        with nnx.use_eager_sharding(False):
            params = nnx.state(self._model(k_params))
        obs, env_state = self.vec.reset(k_env)
        E, A = self.run.env.num_envs, self.num_agents
        rollout = RolloutState(
            env_state=env_state,
            obs=obs,
            carry=networks.initial_carry(self.run.network, (E, A)),
            reset=jnp.ones((E,), bool),
        )
        train = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))
        return RunnerState(train=train, rollout=constrain_batch(rollout), key=jax.random.key_data(k_run))

    def update(self, state: RunnerState) -> tuple[RunnerState, dict]:
        algo = self.run.algo
        key, k_rollout, k_learn = jax.random.split(jax.random.wrap_key_data(state.key), 3)
        params = state.train.params
        sample = lambda k, logits: jax.random.categorical(k, logits).astype(jnp.int32)
        shaping = self.shaping(state.train.step)
        rollout, traj = collect(
            self.vec,
            self.policy_step,
            params,
            state.rollout,
            k_rollout,
            algo.num_steps,
            sample,
            self.legal_actions,
            shaping,
        )

        last_value = self.value(params, rollout.carry, rollout.obs, rollout.reset)
        terminated, truncated = traj.terminated, traj.truncated
        if algo.bootstrap_truncated:
            # V(final_obs_t) from the carry after step t: one batched critic pass over the whole rollout.
            no_reset = jnp.zeros(traj.final_obs.shape[:2], bool)
            final_values = self.value(params, traj.carry, traj.final_obs, no_reset)
        else:
            terminated, truncated = terminated | truncated, jnp.zeros_like(truncated)
            final_values = traj.values
        advantages, returns = gae(
            traj.rewards,
            traj.values,
            final_values,
            terminated,
            truncated,
            last_value,
            algo.gamma,
            algo.gae_lambda,
        )
        batch = {
            "obs": traj.obs,
            "actions": traj.actions,
            "log_probs": traj.log_probs,
            "values": traj.values,
            "advantages": advantages,
            "returns": returns,
            "reset": traj.reset,
        }
        if traj.legal is not None:
            batch["legal"] = traj.legal
        train, losses = self._learn(state.train, batch, state.rollout.carry, k_learn)

        metrics = {
            **episode_metrics(traj),
            **losses,
            **shaping_metrics(shaping),
            "lr": self._current_lr(state.train.step),
            "env_steps": (state.train.step + 1) * self.run.steps_per_update,
        }
        return RunnerState(train=train, rollout=rollout, key=jax.random.key_data(key)), metrics

    def shaping(self, update) -> tuple[str, jax.Array] | None:
        """collect's `shaping` argument for update `update`: (info key, [num_steps] coefficients), or None
        when algo.reward_shaping is off."""
        cfg = self.run.algo.reward_shaping
        if not cfg.info_key:
            return None
        return cfg.info_key, shaping_coefs(cfg, update, self.run.steps_per_update, self.run.algo.num_steps)

    def _current_lr(self, update):
        algo = self.run.algo
        return algo.lr * (1.0 - update / self.num_updates) if algo.anneal_lr else jnp.float32(algo.lr)

    def _learn(self, train: TrainState, batch: dict, carry0, key):
        algo = self.run.algo
        recurrent = self.run.network.kind == "rnn"
        M = algo.num_minibatches

        def loss_fn(params, minibatch, carry):
            if recurrent:

                def step(c, obs, reset):
                    c, logits, values = self.policy_step(params, c, obs, reset)
                    return c, (logits, values)

                logits, values = networks.unroll(step, carry, minibatch["obs"], minibatch["reset"])
            else:
                _, logits, values = self.policy_step(
                    params, (), minibatch["obs"], jnp.zeros(minibatch["obs"].shape[:-2], bool)
                )
            if "legal" in minibatch:
                logits = batching.masked_logits(logits, minibatch["legal"])
            return ppo_loss(logits, values, minibatch, algo)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def sgd_step(carry_state, minibatch_and_carry):
            params, opt_state = carry_state
            minibatch, mb_carry = minibatch_and_carry
            (_, metrics), grads = grad_fn(params, minibatch, mb_carry)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), metrics

        def epoch(carry_state, epoch_key):
            minibatches = batching.minibatches(batch, carry0, epoch_key, M, recurrent)
            return jax.lax.scan(sgd_step, carry_state, minibatches)

        (params, opt_state), metrics = jax.lax.scan(
            epoch, (train.params, train.opt_state), jax.random.split(key, algo.update_epochs)
        )
        metrics = jax.tree.map(jnp.mean, metrics)
        return TrainState(step=train.step + 1, params=params, opt_state=opt_state), metrics

    # --- seeds, shardings, jitted programs ---------------------------------------------------------------

    def seed_keys(self) -> jax.Array:
        """[S] keys: seed s of a run is fold_in(key(train.seed), s), so seed s is the same run whatever
        num_seeds is."""
        base = jax.random.key(self.run.train.seed)
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.arange(self.run.train.num_seeds))

    @functools.cached_property
    def _state_shapes(self) -> RunnerState:
        return jax.eval_shape(jax.vmap(self.init), self.seed_keys())

    @functools.cached_property
    def abstract_state(self) -> RunnerState:
        """The vmapped runner state as ShapeDtypeStructs carrying their shardings (restore target)."""
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            self._state_shapes,
            self.state_shardings,
        )

    @functools.cached_property
    def state_shardings(self) -> RunnerState:
        shapes = self._state_shapes
        seeded_specs = jax.tree.map(
            lambda spec: P(None, *spec), self.param_specs, is_leaf=lambda x: isinstance(x, P)
        )
        param_shardings = rules.tree_shardings(self.mesh, shapes.train.params, seeded_specs)
        rules.check_sharded(self.mesh, shapes.train.params, param_shardings)
        train = state_shardings(self.mesh, shapes.train, param_shardings)
        batch_axes = rules.logical_to_spec(("batch",))[0]
        rollout = jax.tree.map(lambda _: NamedSharding(self.mesh, P(None, batch_axes)), shapes.rollout)
        return RunnerState(train=train, rollout=rollout, key=NamedSharding(self.mesh, P()))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def init_states(self, keys: jax.Array | None = None) -> RunnerState:
        keys = self.seed_keys() if keys is None else keys
        with jax.set_mesh(self.mesh):
            return jax.jit(jax.vmap(self.init), out_shardings=self.state_shardings)(keys)

    def _updates(self, states: RunnerState, n: int):
        def body(states, _):
            return jax.vmap(self.update)(states)

        return jax.lax.scan(body, states, None, length=n)

    def _counted_updates(self, states: RunnerState, count: jax.Array, chunk: int):
        """The first `count` (traced, 1..chunk) of `chunk` updates: a loop whose trip count is an argument,
        so a short last chunk runs in the same program instead of a second compiled one. The body is
        `_updates`' scan body, so each update is the same computation, bit for bit; metrics rows from
        `count` on are left zero."""
        shapes = jax.eval_shape(jax.vmap(self.update), states)[1]
        rows = jax.tree.map(lambda s: jnp.zeros((chunk, *s.shape), s.dtype), shapes)

        def body(i, carry):
            states, rows = carry
            states, metrics = jax.vmap(self.update)(states)
            return states, jax.tree.map(lambda r, m: r.at[i].set(m), rows, metrics)

        return jax.lax.fori_loop(0, count, body, (states, rows))

    @functools.cache  # noqa: B019 (one PPO per run: the cache holds its compiled programs for the run's life)
    def run_updates(self, chunk: int):
        """`(states, count=chunk) -> (states, metrics [chunk, S, ...])`: `count` (1..chunk) updates of every
        seed in one call; metrics rows from `count` on are zero. One program per chunk size, compiled ahead
        of time for the sharded state (`compile_s[chunk]` says how long the compile took)."""
        jitted = jax.jit(
            functools.partial(self._counted_updates, chunk=chunk),
            in_shardings=(self.state_shardings, self.replicated),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):
            compiled = jitted.lower(self.abstract_state, jax.ShapeDtypeStruct((), jnp.int32)).compile()
        self.compile_s[chunk] = time.perf_counter() - start

        def call(states: RunnerState, count: int = chunk):
            if not 1 <= count <= chunk:
                raise ValueError(
                    f"count={count} updates asked of the program compiled for chunks of {chunk}; "
                    f"pass 1 to {chunk}, or ask run_updates() for a larger chunk."
                )
            return compiled(states, np.int32(count))

        return call

    def make_train(self):
        """The purejaxrl form: `keys [S] -> (final states, metrics [num_updates, S, ...])`, one program."""

        def train(keys):
            states = jax.vmap(self.init)(keys)
            return self._updates(
                jax.lax.with_sharding_constraint(states, self.state_shardings), self.num_updates
            )

        jitted = jax.jit(
            train, in_shardings=self.replicated, out_shardings=(self.state_shardings, self.replicated)
        )

        def call(keys):
            with jax.set_mesh(self.mesh):
                return jitted(keys)

        return call
