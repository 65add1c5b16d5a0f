"""IPPO and MAPPO: the same PPO learner (jaxpar.rl.ppo), differing only in what the critic sees; and the
value-based PQN learners (jaxpar.rl.pqn): IQL, VDN, QMIX, differing only in how agents' Q-values mix.

IPPO (de Witt et al. 2020): every agent's critic sees that agent's own observation, like its actor.
MAPPO (Yu et al. 2022): a centralised critic sees the global state (here every agent's observation,
concatenated) while the actors stay decentralised. Both share one set of parameters across agents,
optionally telling agents apart by a one-hot id appended to their inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jaxpar.rl import batching
from jaxpar.rl.config import NetworkConfig

Inputs = Callable[[jax.Array], jax.Array]  # obs [..., A, D] -> network input [..., A, D']


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What the networks see. For PPO, actor_inputs feed the policy and critic_inputs the value head; for
    the Q-learners, actor_inputs feed the per-agent Q-network and critic_inputs the QMIX mixer (the
    global state). `mixer`: "" (PPO), "none" (independent per-agent targets), "vdn" or "qmix" (one team
    target regressed on a sum / a monotonic mix of the agents' chosen Q-values)."""

    name: str
    actor_inputs: Inputs
    critic_inputs: Inputs
    mixer: str = ""

    @property
    def value_based(self) -> bool:
        return bool(self.mixer)


def _maybe_id(cfg: NetworkConfig, fn: Inputs) -> Inputs:
    return (lambda obs: batching.with_agent_id(fn(obs))) if cfg.agent_id else fn


def ippo(cfg: NetworkConfig) -> Algorithm:
    own = _maybe_id(cfg, lambda obs: obs)
    return Algorithm("ippo", actor_inputs=own, critic_inputs=own)


def mappo(cfg: NetworkConfig) -> Algorithm:
    return Algorithm(
        "mappo",
        actor_inputs=_maybe_id(cfg, lambda obs: obs),
        critic_inputs=_maybe_id(cfg, batching.global_state),
    )


def pqn(name: str, mixer: str):
    """PQN Q-learners (Gallici et al. 2024): per-agent Q-values from each agent's own observation; the
    QMIX mixer conditions on the global state."""

    def make(cfg: NetworkConfig) -> Algorithm:
        return Algorithm(
            name,
            actor_inputs=_maybe_id(cfg, lambda obs: obs),
            critic_inputs=batching.global_state,
            mixer=mixer,
        )

    return make


ALGORITHMS = {
    "ippo": ippo,
    "mappo": mappo,
    "pqn_iql": pqn("pqn_iql", "none"),
    "pqn_vdn": pqn("pqn_vdn", "vdn"),
    "pqn_qmix": pqn("pqn_qmix", "qmix"),
}


def get(name: str, cfg: NetworkConfig) -> Algorithm:
    return ALGORITHMS[name](cfg)
