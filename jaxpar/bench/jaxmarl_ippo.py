"""JaxMARL 0.2.0's IPPO-FF MPE baseline, re-implemented here on JaxMARL's own environment.

JaxMARL's baseline training script (`baselines/IPPO/ippo_ff_mpe.py` with `config/ippo_ff_mpe.yaml`) is not
in the `jaxmarl` wheel, so benchmarks cannot import it. This module re-implements what that script does,
in plain JAX, on `jaxmarl.make("MPE_simple_spread_v3")` (imported lazily: this module imports without
jaxmarl installed; only `make_train` needs it):

- one network shared by all agents: separate actor and critic MLPs of 2 x 64 tanh units, orthogonal
  weights (scale sqrt 2 for hidden layers, 0.01 for the policy head, 1.0 for the value head), zero biases;
- 16 envs x 128 steps per update; GAE (gamma 0.99, lambda 0.95) where JaxMARL's `done` (its time limit)
  cuts the return, no bootstrapping; 4 epochs x 4 minibatches of the flattened (step, env, agent) batch,
  shuffled each epoch; clipped policy loss (0.2) on advantages normalised per minibatch, clipped value
  loss (0.2) times 0.5, entropy bonus 0.01; Adam (eps 1e-5) after global-norm clipping at 0.5, its lr
  2.5e-4 annealed linearly to 0 by update;
- its MPE log wrapper's return: each agent's reward x num_agents summed over JaxMARL's 26-transition
  episode, and the logged metric is the mean over the update's batch of the last finished episode's
  value (0 before any episode has finished).

Besides JaxMARL's logged metric, each update also reports the return in the unit of jaxpar and mpe2:
the per-agent reward summed over the first 25 transitions of an episode (mpe2's max_cycles=25 episode;
JaxMARL's episodes have one more transition, see `RETURN_UNIT`), averaged over the agents and the
episodes finished during the update.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

ENV_ID = "MPE_simple_spread_v3"
MPE2_EPISODE = 25  # mpe2's max_cycles: transitions per episode in mpe2 and jaxpar
LABEL = (
    "JaxMARL 0.2.0's env with its IPPO-FF baseline re-implemented in jaxpar/bench/jaxmarl_ippo.py "
    "(the script is not in the wheel)"
)
RETURN_UNIT = (
    "mean return per agent per 25-step episode: each agent's reward summed over the first 25 transitions "
    "of an episode (mpe2 simple_spread_v3 max_cycles=25), averaged over agents and episodes"
)


class Hyper(NamedTuple):
    """ippo_ff_mpe.yaml's settings (total_env_steps is per seed, env steps = num_envs x steps)."""

    total_env_steps: int = 10_000_000
    num_envs: int = 16
    num_steps: int = 128
    update_epochs: int = 4
    num_minibatches: int = 4
    lr: float = 2.5e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64

    @property
    def num_updates(self) -> int:
        return self.total_env_steps // self.num_steps // self.num_envs


def per_agent_25(logged_return: float, num_agents: int) -> float:
    """JaxMARL's logged MPE return (reward x num_agents summed over a 26-transition episode) -> an estimate
    in jaxpar's unit, per agent per 25-step episode: / num_agents x 25/26. Only an estimate (it assumes the
    26th transition earns the episode's mean reward); `make_train` measures the exact 25-step return."""
    if num_agents < 1:
        raise ValueError(f"num_agents={num_agents}; it must be at least 1.")
    return logged_return / num_agents * MPE2_EPISODE / (MPE2_EPISODE + 1)


class EpisodeLog(NamedTuple):
    """Per-env episode accounting: JaxMARL's MPE log wrapper (reward x num_agents, whole episodes) beside
    the 25-step per-agent return of jaxpar and mpe2."""

    running: jax.Array  # [E, A] reward x num_agents summed over the episode so far
    returned: jax.Array  # [E, A] that sum at the end of the env's last finished episode (0 before one)
    ret25: jax.Array  # [E, A] each agent's reward summed over the episode's first 25 transitions so far
    t: jax.Array  # [E] transitions of the episode so far


def init_log(num_envs: int, num_agents: int) -> EpisodeLog:
    zeros = jnp.zeros((num_envs, num_agents), jnp.float32)
    return EpisodeLog(zeros, zeros, zeros, jnp.zeros((num_envs,), jnp.int32))


def log_step(log: EpisodeLog, reward, ep_done) -> tuple[EpisodeLog, jax.Array]:
    """One transition of every env (reward [E, A], ep_done [E]): the new log and, per env, the finished
    episode's 25-step return averaged over agents (0 where no episode finished)."""
    num_agents = reward.shape[-1]
    d = ep_done[:, None].astype(jnp.float32)
    running = log.running + reward * num_agents
    returned = log.returned * (1.0 - d) + running * d
    ret25 = log.ret25 + jnp.where((log.t < MPE2_EPISODE)[:, None], reward, 0.0)
    finished = jnp.where(ep_done, ret25.mean(-1), 0.0)
    new = EpisodeLog(running * (1.0 - d), returned, ret25 * (1.0 - d), jnp.where(ep_done, 0, log.t + 1))
    return new, finished


def _dense(key, n_in: int, n_out: int, scale: float) -> dict:
    return {
        "w": jax.nn.initializers.orthogonal(scale)(key, (n_in, n_out), jnp.float32),
        "b": jnp.zeros((n_out,), jnp.float32),
    }


def init_params(key, obs_dim: int, num_actions: int, hidden: int = 64) -> dict:
    """Actor and critic MLPs (2 x `hidden` tanh) with JaxMARL's orthogonal scales."""
    k = jax.random.split(key, 6)
    root2 = math.sqrt(2.0)
    return {
        "actor": [
            _dense(k[0], obs_dim, hidden, root2),
            _dense(k[1], hidden, hidden, root2),
            _dense(k[2], hidden, num_actions, 0.01),
        ],
        "critic": [
            _dense(k[3], obs_dim, hidden, root2),
            _dense(k[4], hidden, hidden, root2),
            _dense(k[5], hidden, 1, 1.0),
        ],
    }


def _mlp(layers: list, x):
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def apply(params: dict, obs):
    """(logits [..., num_actions], value [...]) for observations [..., obs_dim]."""
    return _mlp(params["actor"], obs), _mlp(params["critic"], obs)[..., 0]


def policy_logits(params: dict, obs):
    """The policy's logits for observations [..., obs_dim]: what an mpe2 replay acts on."""
    return _mlp(params["actor"], obs)


class _Batch(NamedTuple):
    obs: jax.Array  # [T, E, A, D]
    action: jax.Array  # [T, E, A]
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    done: jax.Array  # [T, E] (JaxMARL's __all__, copied to every agent)


def _gae(batch: _Batch, last_value, gamma: float, lam: float):
    done = batch.done[..., None].astype(jnp.float32)  # [T, E, 1]

    def step(carry, x):
        adv, next_value = carry
        reward, value, d = x
        delta = reward + gamma * next_value * (1.0 - d) - value
        adv = delta + gamma * lam * (1.0 - d) * adv
        return (adv, value), adv

    _, adv = jax.lax.scan(
        step, (jnp.zeros_like(last_value), last_value), (batch.reward, batch.value, done), reverse=True
    )
    return adv, adv + batch.value


def make_train(hyper: Hyper, env_kwargs: dict | None = None):
    """`train(key) -> (params, metrics)`: one seed's whole run as one function (jit it; vmap it over keys
    for several seeds). metrics are per update: env_steps, return_25 (mean per-agent return over the first
    25 transitions of the episodes finished in the update; NaN where none finished), logged_return
    (JaxMARL's logged metric), episodes (finished in the update)."""
    import jaxmarl

    env = jaxmarl.make(ENV_ID, **(env_kwargs or {}))
    agents = list(env.agents)
    num_agents = len(agents)
    obs_dim = env.observation_space(agents[0]).shape[0]
    num_actions = env.action_space(agents[0]).n
    h = hyper
    if h.num_updates < 1:
        raise ValueError(
            f"total_env_steps={h.total_env_steps} is under one update ({h.num_envs} envs x {h.num_steps} "
            "steps); raise it."
        )
    batch_size = h.num_steps * h.num_envs * num_agents
    if batch_size % h.num_minibatches:
        raise ValueError(f"num_minibatches={h.num_minibatches} does not divide the batch of {batch_size}.")
    grad_steps = h.update_epochs * h.num_minibatches

    def schedule(count):
        return h.lr * (1.0 - (count // grad_steps) / h.num_updates)

    tx = optax.chain(
        optax.clip_by_global_norm(h.max_grad_norm),
        optax.adam(schedule if h.anneal_lr else h.lr, eps=1e-5),
    )
    stack = lambda d: jnp.stack([d[a] for a in agents], axis=-1)  # noqa: E731
    stack_obs = lambda d: jnp.stack([d[a] for a in agents], axis=-2)  # noqa: E731

    def loss_fn(params, mb, adv, target):
        logits, value = apply(params, mb.obs)
        logp_all = jax.nn.log_softmax(logits)
        logp = jnp.take_along_axis(logp_all, mb.action[..., None], -1)[..., 0]
        v_clipped = mb.value + jnp.clip(value - mb.value, -h.clip_eps, h.clip_eps)
        v_loss = 0.5 * jnp.maximum((value - target) ** 2, (v_clipped - target) ** 2).mean()
        ratio = jnp.exp(logp - mb.log_prob)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - h.clip_eps, 1.0 + h.clip_eps) * adv).mean()
        entropy = -(jnp.exp(logp_all) * logp_all).sum(-1).mean()
        return pg + h.vf_coef * v_loss - h.ent_coef * entropy

    def train(key):
        key, k_init, k_reset = jax.random.split(key, 3)
        params = init_params(k_init, obs_dim, num_actions, h.hidden)
        opt_state = tx.init(params)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(k_reset, h.num_envs))
        obs = stack_obs(obs)  # [E, A, D]
        log = init_log(h.num_envs, num_agents)

        def env_step(carry, k):
            params, env_state, obs, log = carry
            k_act, k_env = jax.random.split(k)
            logits, value = apply(params, obs)
            action = jax.random.categorical(k_act, logits)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), action[..., None], -1)[..., 0]
            act = {a: action[:, i] for i, a in enumerate(agents)}
            next_obs, env_state, reward, done, _ = jax.vmap(env.step)(
                jax.random.split(k_env, h.num_envs), env_state, act
            )
            reward, ep_done = stack(reward), done["__all__"]  # [E, A], [E]
            log, finished = log_step(log, reward, ep_done)
            out = (
                _Batch(obs, action, logp, value, reward, ep_done),
                log.returned.mean(),
                finished.sum(),
                ep_done.sum(),
            )
            return (params, env_state, stack_obs(next_obs), log), out

        def epoch(carry, k):
            params, opt_state, flat = carry
            perm = jax.random.permutation(k, batch_size)
            shuffled = jax.tree.map(lambda x: x[perm].reshape(h.num_minibatches, -1, *x.shape[1:]), flat)

            def minibatch(c, mb):
                params, opt_state = c
                b, adv, target = mb
                grads = jax.grad(loss_fn)(params, b, adv, target)
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            (params, opt_state), _ = jax.lax.scan(minibatch, (params, opt_state), shuffled)
            return (params, opt_state, flat), None

        def update(carry, k):
            params, opt_state, env_state, obs, log = carry
            k_roll, k_epochs = jax.random.split(k)
            (params, env_state, obs, log), (batch, logged, fin_sum, fin_n) = jax.lax.scan(
                env_step, (params, env_state, obs, log), jax.random.split(k_roll, h.num_steps)
            )
            _, last_value = apply(params, obs)
            adv, target = _gae(batch, last_value, h.gamma, h.gae_lambda)
            per_actor = batch._replace(done=jnp.broadcast_to(batch.done[..., None], batch.reward.shape))
            flat = jax.tree.map(lambda x: x.reshape(batch_size, *x.shape[3:]), (per_actor, adv, target))
            (params, opt_state, _), _ = jax.lax.scan(
                epoch, (params, opt_state, flat), jax.random.split(k_epochs, h.update_epochs)
            )
            n = fin_n.sum()
            metrics = {
                "return_25": jnp.where(n > 0, fin_sum.sum() / jnp.maximum(n, 1), jnp.nan),
                "logged_return": logged.mean(),
                "episodes": n,
            }
            return (params, opt_state, env_state, obs, log), metrics

        carry = (params, opt_state, env_state, obs, log)
        (params, *_), metrics = jax.lax.scan(update, carry, jax.random.split(key, h.num_updates))
        metrics["env_steps"] = (jnp.arange(h.num_updates) + 1) * h.num_steps * h.num_envs
        return params, metrics

    return train


def run(hyper: Hyper, seed: int) -> tuple[dict, dict]:
    """One seed's run, compiled and executed: (params, metrics as numpy arrays)."""
    params, metrics = jax.jit(make_train(hyper))(jax.random.key(seed))
    return jax.device_get(params), {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
