"""Value-based multi-agent learners in the PQN style (Gallici et al. 2024, "Simplifying Deep Temporal
Difference Learning"): independent Q-learning (pqn_iql), VDN (pqn_vdn) and QMIX (pqn_qmix).

No replay buffer and no target network: one update (per seed) collects `num_steps` transitions of
`num_envs` parallel envs acting epsilon-greedily on the online Q-network (rollout.collect), computes
Q(lambda) targets over the rollout with the same network's values, then regresses the Q-values of the
actions taken on them for `update_epochs` passes of `num_minibatches` shuffled minibatches (feed-forward:
env steps; recurrent: whole env sequences unrolled from their starting carry, as recurrent PPO does).
LayerNorm after every hidden layer keeps this stable without a target network (the paper's point).

Q(lambda) with V(s) = max_a Q(s, a):  G_t = r_t + gamma * [(1 - lambda) V(s_t+1) + lambda G_t+1]. That is
GAE's advantage + value computed with these values (expand A_t = delta_t + gamma lambda A_t+1), so
`jaxpar.rl.gae` computes it, terminations and truncations kept apart; the last step bootstraps from the
value after the rollout.

Agents share one Q-network (an optional one-hot id in its input). IQL: each agent regresses its own
Q(o_a, u_a) on its own target. VDN (Sunehag et al. 2018): the sum of the agents' chosen Q-values is
regressed on the team target (team reward = sum of the agents' rewards, bootstrapped from the sum of
their greedy values). QMIX (Rashid et al. 2018): the sum is replaced by a mixing network, monotonic in
every agent's Q-value, whose weights hypernetworks make from the global state.

Everything else (seeds vmapped, shardings, compiled chunks of updates, checkpoints, evaluation) is
PPO's runtime: the learner subclasses `jaxpar.rl.ppo.PPO` and replaces the model, the update and the
acting. Its `policy_step` puts the Q-values where PPO's logits go, so the shared rollout masks illegal
actions (environments overriding `legal_actions`) out of them, argmax is the greedy action and `sample`
acts epsilon-greedily over the legal ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpar.rl import batching, networks
from jaxpar.rl.config import NetworkConfig
from jaxpar.rl.gae import gae
from jaxpar.rl.ppo import PPO, RunnerState
from jaxpar.rl.rollout import collect, constrain_batch, episode_metrics, shaping_metrics
from jaxpar.train.state import TrainState

# --- networks ---------------------------------------------------------------------------------------


class LayerNorm(nnx.Module):
    """Normalise over the last axis, then a learned scale and shift (small: replicated like biases)."""

    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(None,))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=(None,))

    def __call__(self, x):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...]


class QNetwork(nnx.Module):
    """Per-agent Q-values: `layers` x (Dense, LayerNorm, activation) ("ff"), or Dense-LayerNorm embedding
    -> GRU -> Dense-LayerNorm ("rnn"), then a linear head over the actions. Weights carry the logical
    names of jaxpar.rl.networks' towers. Carry: () for "ff", (GRU state [..., H],) for "rnn"."""

    def __init__(self, din: int, num_actions: int, cfg: NetworkConfig, rngs: nnx.Rngs):
        self.recurrent = cfg.kind == "rnn"
        self.activation = cfg.activation
        H, gain = cfg.hidden, np.sqrt(2)
        if self.recurrent:
            self.embed = networks.Dense(din, H, (None, "embed"), gain, rngs)
            self.embed_norm = LayerNorm(H)
            self.gru = networks.GRU(H, H, rngs)
            self.post = networks.Dense(H, H, ("embed", "mlp"), gain, rngs)
            self.post_norm = LayerNorm(H)
            head_in = "mlp"
        else:
            dims = [din] + [H] * cfg.layers
            names = [(None, "embed")] + [
                ("embed", "mlp") if i % 2 else ("mlp", "embed") for i in range(1, cfg.layers)
            ]
            self.layers = nnx.List(
                [networks.Dense(dims[i], dims[i + 1], names[i], gain, rngs) for i in range(cfg.layers)]
            )
            self.norms = nnx.List([LayerNorm(H) for _ in range(cfg.layers)])
            head_in = names[-1][1]
        self.head = networks.Dense(H, num_actions, (head_in, None), 1.0, rngs)

    def __call__(self, carry, x, reset):
        act = networks.ACTIVATIONS[self.activation]
        if self.recurrent:
            (h,) = carry
            h = jnp.where(reset[..., None], 0.0, h)
            h = self.gru(h, act(self.embed_norm(self.embed(x))))
            x = act(self.post_norm(self.post(h)))
            carry = (h,)
        else:
            for layer, norm in zip(self.layers, self.norms):
                x = act(norm(layer(x)))
        return carry, self.head(x)


class QMixer(nnx.Module):
    """QMIX's mixing network: Q_tot = elu(q_A . |W1(s)| + b1(s)) . |W2(s)| + V(s), each of W1, b1, W2, V
    made from the global state s by a hypernetwork; the absolute values make Q_tot monotonic in every
    agent's Q, so each agent's greedy action is the team's."""

    def __init__(self, state_dim: int, num_agents: int, embed: int, rngs: nnx.Rngs):
        self.num_agents, self.embed = num_agents, embed
        self.state_norm = LayerNorm(state_dim)
        self.w1 = networks.Dense(state_dim, num_agents * embed, (None, "embed"), 1.0, rngs)
        self.b1 = networks.Dense(state_dim, embed, (None, "embed"), 1.0, rngs)
        self.w2 = networks.Dense(state_dim, embed, (None, "embed"), 1.0, rngs)
        self.v1 = networks.Dense(state_dim, embed, (None, "embed"), np.sqrt(2), rngs)
        self.v2 = networks.Dense(embed, 1, ("embed", None), 1.0, rngs)

    def __call__(self, q_A, state):
        state = self.state_norm(state)
        w1 = jnp.abs(self.w1(state)).reshape(*state.shape[:-1], self.num_agents, self.embed)
        hidden = jax.nn.elu(jnp.einsum("...a,...ae->...e", q_A, w1) + self.b1(state))
        v = self.v2(jax.nn.relu(self.v1(state)))[..., 0]
        return jnp.sum(hidden * jnp.abs(self.w2(state)), axis=-1) + v


class QModel(nnx.Module):
    def __init__(self, din, state_dim, num_agents, num_actions, cfg: NetworkConfig, mixer, embed, rngs):
        self.q = QNetwork(din, num_actions, cfg, rngs)
        self.mixer = QMixer(state_dim, num_agents, embed, rngs) if mixer == "qmix" else None


# --- pieces tested on their own ----------------------------------------------------------------------


def q_lambda_targets(rewards, values, final_values, terminated, truncated, last_value, gamma, lam):
    """Q(lambda) targets [T, ...] (PQN's lambda-returns): values[t] = V(s_t) = max_a Q(s_t, a) of the
    network that collected the rollout, final_values[t] the value of the observation step t reached
    (bootstraps a truncated step), last_value the value after the rollout."""
    return gae(rewards, values, final_values, terminated, truncated, last_value, gamma, lam)[1]


MASKED = -1e8  # batching.masked_logits and the rollout's legal-action mask set masked entries to -1e9


def epsilon_greedy(key, q, epsilon):
    """Actions [...] acting greedily on `q` [..., n] with probability 1 - epsilon, otherwise uniformly over
    the actions whose value is not masked (below MASKED); the greedy action is always an unmasked one."""
    k_explore, k_uniform = jax.random.split(key)
    greedy = jnp.argmax(q, axis=-1)
    uniform = jax.random.categorical(k_uniform, jnp.where(q > MASKED, 0.0, -jnp.inf))
    explore = jax.random.bernoulli(k_explore, epsilon, greedy.shape)
    return jnp.where(explore, uniform, greedy).astype(jnp.int32)


def greedy_value(q, mask=None):
    """max_a Q over the valid actions (`mask` [..., n] bool, None: those `q` does not mask itself)."""
    return jnp.max(q if mask is None else jnp.where(mask, q, -jnp.inf), axis=-1)


def chosen_q(q, actions):
    return jnp.take_along_axis(q, actions[..., None].astype(jnp.int32), axis=-1)[..., 0]


def td_loss(predicted, targets):
    """Half the mean squared error to fixed targets (the targets get no gradient)."""
    return 0.5 * jnp.mean(jnp.square(predicted - jax.lax.stop_gradient(targets)))


# --- the learner ------------------------------------------------------------------------------------


class PQN(PPO):
    """`PPO`'s runtime with a Q-learner's model, acting and update (see the module docstring)."""

    def _model(self, key):
        return QModel(
            self.actor_dim,
            self.critic_dim,
            self.num_agents,
            self.num_actions,
            self.run.network,
            self.algo.mixer,
            self.run.algo.mixer_embed,
            rngs=nnx.Rngs(key),
        )

    @property
    def team(self) -> bool:
        """One team target (VDN, QMIX) instead of one per agent (IQL)."""
        return self.algo.mixer != "none"

    def initial_carry(self, batch_shape):
        if self.run.network.kind == "ff":
            return ()
        return (jnp.zeros((*batch_shape, self.run.network.hidden), jnp.float32),)

    def q_values(self, params, carry, obs, reset):
        """(carry, Q [..., A, n]) for observations [..., A, D]; reset [...]."""
        with nnx.use_eager_sharding(False):
            model = nnx.merge(self.graphdef, params)
        reset_A = jnp.broadcast_to(reset[..., None], obs.shape[:-1])
        return model.q(carry, self.algo.actor_inputs(obs), reset_A)

    def policy_step(self, params, carry, obs, reset):
        """(carry, Q [..., A, n], Q [..., A, n]): the Q-values fill both the logits slot (the rollout masks
        illegal actions there and `sample` acts epsilon-greedily on them) and the values slot (the update
        takes their max over the legal actions). Actions beyond an agent's count are masked here."""
        carry, q = self.q_values(params, carry, obs, reset)
        q = batching.masked_logits(q, self.mask)
        return carry, q, q

    def value(self, params, carry, obs, reset, legal=None):
        """max_a Q [..., A] over the valid (and, given `legal` [..., A, n], legal) actions: bootstraps."""
        return greedy_value(self.policy_step(params, carry, obs, reset)[1], legal)

    def sample(self, key, q, epsilon=None):
        """Epsilon-greedy actions on (masked) Q-values; epsilon defaults to algo.eps_finish (evaluation's
        "sampled" mode)."""
        return epsilon_greedy(key, q, self.run.algo.eps_finish if epsilon is None else epsilon)

    def mix(self, params, q_A, obs):
        """Agents' Q-values [..., A] -> the team's [...] (VDN: sum; QMIX: the mixer on the global state)."""
        if self.algo.mixer == "vdn":
            return jnp.sum(q_A, axis=-1)
        with nnx.use_eager_sharding(False):
            model = nnx.merge(self.graphdef, params)
        return model.mixer(q_A, self.algo.critic_inputs(obs)[..., 0, :])

    def epsilon(self, update):
        algo = self.run.algo
        decay_updates = max(1, round(algo.eps_decay * self.num_updates))
        frac = jnp.clip(update / decay_updates, 0.0, 1.0)
        return algo.eps_start + (algo.eps_finish - algo.eps_start) * frac

    def init(self, key: jax.Array) -> RunnerState:
        state = super().init(key)
        carry = self.initial_carry((self.run.env.num_envs, self.num_agents))
        return state.replace(rollout=constrain_batch(state.rollout.replace(carry=carry)))

    def update(self, state: RunnerState) -> tuple[RunnerState, dict]:
        algo = self.run.algo
        key, k_rollout, k_learn = jax.random.split(jax.random.wrap_key_data(state.key), 3)
        params = state.train.params
        epsilon = self.epsilon(state.train.step)
        sample = lambda k, q: self.sample(k, q, epsilon)
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

        # traj.values[t] = Q(obs_t, .) of the collecting network; V = its max over the legal actions.
        values, rewards = greedy_value(traj.values, traj.legal), traj.rewards
        last_legal = None if self.legal_actions is None else self.legal_actions(rollout.env_state)
        last_value = self.value(params, rollout.carry, rollout.obs, rollout.reset, last_legal)
        terminated, truncated = traj.terminated, traj.truncated
        if algo.bootstrap_truncated:
            # A time limit's final observation: its legal actions are not kept, so all valid ones count.
            no_reset = jnp.zeros(traj.final_obs.shape[:2], bool)
            final_values = self.value(params, traj.carry, traj.final_obs, no_reset)
        else:
            terminated, truncated = terminated | truncated, jnp.zeros_like(truncated)
            final_values = values
        if self.team:
            values = self.mix(params, values, traj.obs)
            final_values = self.mix(params, final_values, traj.final_obs)
            last_value = self.mix(params, last_value, rollout.obs)
            rewards = jnp.sum(rewards, axis=-1)
            terminated, truncated = jnp.all(terminated, axis=-1), jnp.all(truncated, axis=-1)
        targets = q_lambda_targets(
            rewards, values, final_values, terminated, truncated, last_value, algo.gamma, algo.gae_lambda
        )
        batch = {"obs": traj.obs, "actions": traj.actions, "targets": targets, "reset": traj.reset}
        train, losses = self._learn(state.train, batch, state.rollout.carry, k_learn)
        metrics = {
            **episode_metrics(traj),
            **losses,
            "epsilon": epsilon,
            **shaping_metrics(shaping),
            "lr": self._current_lr(state.train.step),
            "env_steps": (state.train.step + 1) * self.run.steps_per_update,
        }
        return RunnerState(train=train, rollout=rollout, key=jax.random.key_data(key)), metrics

    def loss(self, params, minibatch: dict, carry):
        """(TD loss, metrics) of a minibatch: [N, A, ...] env steps, or [T, N, A, ...] sequences unrolled
        from `carry` when recurrent."""
        if self.run.network.kind == "rnn":

            def step(c, obs, reset):
                return self.q_values(params, c, obs, reset)

            q = networks.unroll(step, carry, minibatch["obs"], minibatch["reset"])
        else:
            _, q = self.q_values(params, (), minibatch["obs"], jnp.zeros(minibatch["obs"].shape[:-2], bool))
        q_taken = chosen_q(q, minibatch["actions"])
        predicted = self.mix(params, q_taken, minibatch["obs"]) if self.team else q_taken
        loss = td_loss(predicted, minibatch["targets"])
        return loss, {"value_loss": loss, "q_mean": jnp.mean(predicted)}

    def _learn(self, train: TrainState, batch: dict, carry0, key):
        algo = self.run.algo
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)

        def sgd_step(carry_state, minibatch_and_carry):
            params, opt_state = carry_state
            (_, metrics), grads = grad_fn(params, *minibatch_and_carry)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), metrics

        def epoch(carry_state, epoch_key):
            parts = batching.minibatches(
                batch, carry0, epoch_key, algo.num_minibatches, self.run.network.kind == "rnn"
            )
            return jax.lax.scan(sgd_step, carry_state, parts)

        (params, opt_state), metrics = jax.lax.scan(
            epoch, (train.params, train.opt_state), jax.random.split(key, algo.update_epochs)
        )
        metrics = jax.tree.map(jnp.mean, metrics)
        return TrainState(step=train.step + 1, params=params, opt_state=opt_state), metrics
