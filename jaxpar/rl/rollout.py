"""Rollout collection: `num_steps` steps of a batch of envs and the policy in one `lax.scan`.

The env is `EpisodeStats(VecEnv(env, num_envs))`: autoreset inside, `info["final_obs"]` kept for
bootstrapping truncated episodes, per-agent episode returns reported on the step an episode ends.
Actions are drawn with one key per step for the whole [E, A] batch: threefry is partitionable (jax's
default), so each env's draw is the same however the batch is split over devices.

Environments with rules (`MultiAgentEnv.legal_actions` overridden, e.g. Hanabi) pass `legal_actions`:
illegal actions' logits become a large negative number before sampling, and the masks are kept in the
transitions so the learner masks the same logits in its loss. Without it nothing changes.

Reward shaping (`algo.reward_shaping`, any learner): `shaping=(info_key, coefs)` makes the transitions'
rewards env reward + coefs[t] * info[info_key] for rollout step t (`shaping_coefs` gives the schedule's
coefficient at each step's env-step count), while the episode statistics keep the env's own reward, so
the logged return is the task's. PPO and PQN both collect through here, so both train on the same thing.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxpar.envs.wrappers import episode_done
from jaxpar.parallel.rules import constrain
from jaxpar.rl.batching import masked_logits
from jaxpar.rl.config import RewardShapingConfig
from jaxpar.rl.losses import categorical_log_prob


@struct.dataclass
class RolloutState:
    env_state: object
    obs: jax.Array  # [E, A, D] the observation the policy acts on next
    carry: object  # network carry at `obs` (() for feed-forward networks)
    reset: jax.Array  # [E] bool: `obs` starts a new episode (recurrent state is zeroed first)


@struct.dataclass
class Transition:
    obs: jax.Array  # [E, A, D]
    actions: jax.Array  # [E, A]
    log_probs: jax.Array  # [E, A]
    values: jax.Array  # [E, A]
    rewards: jax.Array  # [E, A] what the learner trains on: the env's reward plus any shaping bonus
    terminated: jax.Array  # [E, A]
    truncated: jax.Array  # [E, A]
    reset: jax.Array  # [E] bool: obs started an episode
    final_obs: jax.Array  # [E, A, D] the observation this step reached (before any autoreset)
    carry: object  # network carry after this step (recurrent bootstrap values need it)
    episode_done: jax.Array  # [E] bool
    episode_return: jax.Array  # [E, A] return of the episode that ended here (valid where episode_done)
    episode_length: jax.Array  # [E]
    legal: jax.Array | None = None  # [E, A, n] bool legal actions at `obs` (None: every action legal)


# (params, carry, obs [E, A, D], reset [E]) -> (carry, logits [E, A, n], values [E, A])
PolicyStep = Callable[..., tuple]


def shaping_coefs(cfg: RewardShapingConfig, update: jax.Array, steps_per_update: int, num_steps: int):
    """[num_steps] coefficients of the shaping bonus for the rollout of update `update` (0-based): step t
    of it comes after update * steps_per_update + t * num_envs env steps of the seed's training, and the
    coefficient goes linearly from cfg.start_coef to cfg.end_coef over cfg.anneal_env_steps of them."""
    num_envs = steps_per_update // num_steps
    env_steps = update * steps_per_update + jnp.arange(num_steps) * num_envs
    if cfg.anneal_env_steps == 0:
        return jnp.full((num_steps,), cfg.start_coef, jnp.float32)
    frac = jnp.clip(env_steps / cfg.anneal_env_steps, 0.0, 1.0)
    return (cfg.start_coef + (cfg.end_coef - cfg.start_coef) * frac).astype(jnp.float32)


def shaping_metrics(shaping: tuple[str, jax.Array] | None) -> dict:
    """The coefficient at the first step of a rollout collected with `shaping` (logged as shaping_coef)."""
    return {} if shaping is None else {"shaping_coef": shaping[1][0]}


def batch_names(x) -> tuple:
    return ("batch",) + (None,) * (x.ndim - 1)


def constrain_batch(tree):
    """Keep every leaf's leading env axis on the mesh's batch axes."""
    return jax.tree.map(lambda x: constrain(x, batch_names(x)), tree)


def collect(
    vec_env,
    policy_step: PolicyStep,
    params,
    state: RolloutState,
    key: jax.Array,
    num_steps: int,
    sample: Callable[[jax.Array, jax.Array], jax.Array],
    legal_actions: Callable[[object], jax.Array] | None = None,
    shaping: tuple[str, jax.Array] | None = None,
):
    """(final RolloutState, Transition stacked on a leading [num_steps] axis). `legal_actions(env_state)`
    -> [E, A, n] bool, when given, masks the policy's logits to the legal actions. `shaping` =
    (info_key, coefs [num_steps]), when given, adds coefs[t] * info[info_key] to step t's rewards."""
    coefs = jnp.zeros((num_steps,), jnp.float32) if shaping is None else shaping[1]

    def body(state: RolloutState, xs):
        step_key, coef = xs
        k_act, k_env = jax.random.split(step_key)
        carry, logits, values = policy_step(params, state.carry, state.obs, state.reset)
        legal = None if legal_actions is None else legal_actions(state.env_state)
        if legal is not None:
            logits = masked_logits(logits, legal)
        actions = constrain(sample(k_act, logits), ("batch", None))
        logp, _ = categorical_log_prob(logits, actions)
        obs, env_state, reward, terminated, truncated, info = vec_env.step(k_env, state.env_state, actions)
        done = episode_done(terminated, truncated)
        if shaping is not None:
            reward = reward + coef * jnp.broadcast_to(info[shaping[0]], reward.shape)
        transition = Transition(
            obs=state.obs,
            actions=actions,
            log_probs=logp,
            values=values,
            rewards=reward,
            terminated=terminated,
            truncated=truncated,
            reset=state.reset,
            final_obs=info["final_obs"],
            carry=carry,
            episode_done=info["returned_episode"],
            episode_return=info["returned_episode_return"],
            episode_length=info["returned_episode_length"],
            legal=legal,
        )
        next_state = constrain_batch(RolloutState(env_state=env_state, obs=obs, carry=carry, reset=done))
        return next_state, transition

    return jax.lax.scan(body, state, (jax.random.split(key, num_steps), coefs))


def episode_metrics(traj: Transition) -> dict:
    """Mean per-agent return and length of the episodes that ended during the rollout (NaN if none)."""
    done = traj.episode_done.astype(jnp.float32)  # [T, E]
    count = jnp.sum(done)
    safe = jnp.maximum(count, 1.0)
    per_agent = jnp.sum(done[..., None] * traj.episode_return, axis=(0, 1)) / safe  # [A]
    length = jnp.sum(done * traj.episode_length) / safe
    nan = jnp.float32(jnp.nan)
    return {
        "return_per_agent": jnp.where(count > 0, per_agent, nan),
        "episode_return": jnp.where(count > 0, jnp.mean(per_agent), nan),
        "episode_length": jnp.where(count > 0, length, nan),
        "episodes": count,
    }
