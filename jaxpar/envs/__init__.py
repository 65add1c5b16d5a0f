"""Vectorised multi-agent environments: a functional API, a registry filled by decorators, wrappers, and
the runtime that places a batch of environments on the mesh's data axes.

    env = jaxpar.envs.make("simple_spread_v3", N=4)
    obs, state = env.reset(key)
    obs, state, reward, terminated, truncated, info = env.step(key, state, actions)
"""

# Importing the families (coin_game, hanabi, mpe, overcooked, switch_riddle) registers their ids.
from jaxpar.envs import coin_game, hanabi, mpe, overcooked, spaces, switch_riddle, wrappers
from jaxpar.envs.core import MultiAgentEnv, Wrapper
from jaxpar.envs.registry import make, register, registered_ids

__all__ = [
    "MultiAgentEnv",
    "Wrapper",
    "make",
    "register",
    "registered_ids",
    "spaces",
    "wrappers",
    "coin_game",
    "hanabi",
    "mpe",
    "overcooked",
    "switch_riddle",
]
