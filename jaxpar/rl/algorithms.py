"""IPPO and MAPPO: the same PPO learner (jaxpar.rl.ppo), differing only in what the critic sees.

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
    name: str
    actor_inputs: Inputs
    critic_inputs: Inputs


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


ALGORITHMS = {"ippo": ippo, "mappo": mappo}


def get(name: str, cfg: NetworkConfig) -> Algorithm:
    return ALGORITHMS[name](cfg)
