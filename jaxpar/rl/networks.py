"""Actor-critic networks (Flax NNX) with logical axis names on every weight, like the language models.

Hidden widths are named "embed" (-> fsdp) and "mlp" (-> tensor) by `jaxpar.parallel.rules`, so a policy is
replicated on a data-parallel mesh and sharded (ZeRO-3 style) when the mesh has an fsdp axis. Biases are
small and stay replicated.

Every network has one interface, a single time step over any leading axes:

    carry, logits, value = net(carry, actor_in, critic_in, reset)

`carry` is () for feed-forward networks and (actor GRU state, critic GRU state) [..., H] each for
recurrent ones; `reset` [...] (True where a new episode starts at this input) zeroes the GRU state
first. `unroll` applies it along a leading time axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.rl.config import NetworkConfig

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


def orthogonal(key: jax.Array, shape: tuple[int, int], scale: float) -> jax.Array:
    """A uniformly random (Haar) orthogonal matrix times `scale`: Gram-Schmidt (applied twice, for
    accuracy) on the columns of a Gaussian matrix, which is QR with positive diagonal.

    Written with plain XLA ops instead of `jax.nn.initializers.orthogonal` (a LAPACK QR): vmapped over
    seeds, that QR becomes a batched LAPACK call whose parallel batch loop deadlocks on the CPU client's
    thread pool when it simulates several devices on a 2-core machine (jaxlib 0.10.2)."""
    rows, cols = shape
    big, small = max(rows, cols), min(rows, cols)
    a = jax.random.normal(key, (big, small), jnp.float32)

    def column(i, q):
        earlier = (jnp.arange(small) < i).astype(q.dtype)
        v = q[:, i]
        for _ in range(2):
            v = v - q @ ((q.T @ v) * earlier)
        return q.at[:, i].set(v / jnp.linalg.norm(v))

    q = jax.lax.fori_loop(0, small, column, a)
    return scale * (q if rows >= cols else q.T)


class Dense(nnx.Module):
    """x @ kernel + bias with an orthogonal kernel scaled by `scale` (the PPO convention)."""

    def __init__(self, din: int, dout: int, names: tuple, scale: float, rngs: nnx.Rngs):
        kernel = orthogonal(rngs.params(), (din, dout), scale)
        self.kernel = nnx.Param(kernel, out_sharding=names)
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32), out_sharding=(None,))

    def __call__(self, x):
        return x @ self.kernel[...] + self.bias[...]


def _hidden_names(index: int) -> tuple:
    """Logical names of hidden layer `index`'s kernel: the first maps the input to "embed"; later ones
    ("embed", "mlp") and ("mlp", "embed") alternate so consecutive layers shard on the same axis."""
    if index == 0:
        return (None, "embed")
    return ("embed", "mlp") if index % 2 else ("mlp", "embed")


def _out_name(index: int) -> str:
    return _hidden_names(index)[1]


class MLP(nnx.Module):
    def __init__(self, din: int, hidden: int, layers: int, activation: str, rngs: nnx.Rngs):
        dims = [din] + [hidden] * layers
        self.layers = nnx.List(
            [Dense(dims[i], dims[i + 1], _hidden_names(i), np.sqrt(2), rngs) for i in range(layers)]
        )
        self.activation = activation
        self.out_name = _out_name(layers - 1)

    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        for layer in self.layers:
            x = act(layer(x))
        return x


class GRU(nnx.Module):
    """A GRU cell (the gate equations of flax's GRUCell), input and recurrent weights fused per gate."""

    def __init__(self, din: int, hidden: int, rngs: nnx.Rngs):
        self.hidden = hidden
        self.input = Dense(din, 3 * hidden, ("embed", "mlp"), 1.0, rngs)
        self.recurrent = Dense(hidden, 3 * hidden, ("embed", "mlp"), 1.0, rngs)

    def __call__(self, h, x):
        gi, gh = self.input(x), self.recurrent(h)
        H = self.hidden
        r = jax.nn.sigmoid(gi[..., :H] + gh[..., :H])
        z = jax.nn.sigmoid(gi[..., H : 2 * H] + gh[..., H : 2 * H])
        n = jnp.tanh(gi[..., 2 * H :] + r * gh[..., 2 * H :])
        return (1.0 - z) * n + z * h


class Tower(nnx.Module):
    """One of actor or critic: MLP (ff) or embedding -> GRU -> hidden layer (rnn), then a linear head."""

    def __init__(self, din: int, dout: int, head_scale: float, cfg: NetworkConfig, rngs: nnx.Rngs):
        self.recurrent = cfg.kind == "rnn"
        self.activation = cfg.activation
        if self.recurrent:
            self.embed = Dense(din, cfg.hidden, (None, "embed"), np.sqrt(2), rngs)
            self.gru = GRU(cfg.hidden, cfg.hidden, rngs)
            self.post = Dense(cfg.hidden, cfg.hidden, ("embed", "mlp"), np.sqrt(2), rngs)
            head_in = "mlp"
        else:
            self.mlp = MLP(din, cfg.hidden, cfg.layers, cfg.activation, rngs)
            head_in = self.mlp.out_name
        self.head = Dense(cfg.hidden, dout, (head_in, None), head_scale, rngs)

    def __call__(self, h, x, reset):
        act = ACTIVATIONS[self.activation]
        if self.recurrent:
            h = jnp.where(reset[..., None], 0.0, h)
            h = self.gru(h, act(self.embed(x)))
            x = act(self.post(h))
        else:
            x = self.mlp(x)
        return h, self.head(x)


class ActorCritic(nnx.Module):
    """Separate actor and critic towers (the critic's input is the observation for IPPO and the global
    state for MAPPO); logits over `num_actions` and a scalar value per agent."""

    def __init__(self, actor_dim: int, critic_dim: int, num_actions: int, cfg: NetworkConfig, rngs: nnx.Rngs):
        self.actor = Tower(actor_dim, num_actions, 0.01, cfg, rngs)
        self.critic = Tower(critic_dim, 1, 1.0, cfg, rngs)

    def __call__(self, carry, actor_in, critic_in, reset):
        h_actor, h_critic = carry if carry else (None, None)
        h_actor, logits = self.actor(h_actor, actor_in, reset)
        h_critic, value = self.critic(h_critic, critic_in, reset)
        carry = (h_actor, h_critic) if carry else ()
        return carry, logits, value[..., 0]

    def value(self, carry, critic_in, reset):
        """The critic alone (bootstrap values of final observations)."""
        h_critic = carry[1] if carry else None
        return self.critic(h_critic, critic_in, reset)[1][..., 0]


def initial_carry(cfg: NetworkConfig, batch_shape: tuple[int, ...]):
    if cfg.kind == "ff":
        return ()
    zeros = jnp.zeros((*batch_shape, cfg.hidden), jnp.float32)
    return (zeros, zeros)


def unroll(step, carry, *sequences):
    """`step(carry, *inputs) -> (carry, outputs)` along the leading time axis of `sequences`; the
    outputs stacked [T, ...]."""
    _, outputs = jax.lax.scan(lambda c, xs: step(c, *xs), carry, sequences)
    return outputs
