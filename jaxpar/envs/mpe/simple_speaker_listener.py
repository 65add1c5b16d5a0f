"""simple_speaker_listener_v4: an immovable speaker sees the goal colour and says one of 3 words; a mute
listener moves (mpe2 `simple_speaker_listener/simple_speaker_listener.py`).

Observation: speaker [goal landmark colour], listener [vel, landmarks - pos, speaker's utterance]. Both
get -|listener - goal|^2.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxpar.envs.mpe.env import MPEEnv
from jaxpar.envs.mpe.world import AgentSpec, LandmarkSpec, World, relative, rows
from jaxpar.envs.registry import register

LANDMARK_COLOURS = np.array([[0.65, 0.15, 0.15], [0.15, 0.65, 0.15], [0.15, 0.15, 0.65]], np.float32)


@register("simple_speaker_listener_v4")
class SimpleSpeakerListener(MPEEnv):
    goal_sizes = (3,)

    def __init__(self, max_cycles: int = 25, continuous_actions: bool = False):
        agents = [
            AgentSpec("speaker_0", size=0.075, movable=False, collide=False),
            AgentSpec("listener_0", size=0.075, silent=True, collide=False),
        ]
        world = World(
            agents, [LandmarkSpec(f"landmark {i}", size=0.04, collide=False) for i in range(3)], dim_c=3
        )
        super().__init__(world, max_cycles=max_cycles, continuous_actions=continuous_actions)

    def observation_blocks(self, s):
        speaker = rows(1, jnp.asarray(LANDMARK_COLOURS)[s.goal])
        listener = rows(1, s.agent_vel[1:], relative(s.agent_pos[1:], s.landmark_pos), s.comm[:1])
        return [speaker, listener]

    def agent_rewards(self, s):
        dist2 = jnp.sum(jnp.square(s.agent_pos[1] - s.landmark_pos[s.goal[0]]))
        return jnp.full((2,), -dist2, jnp.float32)
