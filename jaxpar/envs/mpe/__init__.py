"""The nine MPE scenarios of mpe2 1.1.1 under their PettingZoo ids, with mpe2's semantics exactly.

Importing this package registers them. Differences from JaxMARL's ports that matter here: an episode is
max_cycles transitions (not max_cycles + 1); simple_tag obstacles start in U(-0.9, 0.9); every scenario
handles any number of good agents (rewards and observations index roles by slices, never a clamped static
index); observations include every other good agent's velocity.
"""

from jaxpar.envs.mpe import (
    simple,
    simple_adversary,
    simple_crypto,
    simple_push,
    simple_reference,
    simple_speaker_listener,
    simple_spread,
    simple_tag,
    simple_world_comm,
)
from jaxpar.envs.mpe.env import MPEEnv
from jaxpar.envs.mpe.world import MPEState

# The scenario modules are listed because importing them is what registers their ids.
__all__ = [
    "MPEEnv",
    "MPEState",
    "simple",
    "simple_adversary",
    "simple_crypto",
    "simple_push",
    "simple_reference",
    "simple_speaker_listener",
    "simple_spread",
    "simple_tag",
    "simple_world_comm",
]
