"""Animations of MPE episodes (matplotlib, pillow writer): agents and landmarks drawn at their sizes."""

from __future__ import annotations

import numpy as np


def _mpe_state(state):
    """The MPEState inside wrapper states (EpisodeStats keeps it in `env_state`), or None."""
    while state is not None and not hasattr(state, "agent_pos"):
        state = getattr(state, "env_state", None)
    return state


def animate(env, states, num_frames: int, path: str, fps: int = 10, title: str = "") -> str | None:
    """Writes a GIF of `states` (a state pytree with a leading time axis) to `path`; returns the path, or
    None when the environment has no positions to draw (non-MPE envs)."""
    world = getattr(env.unwrapped, "world", None)
    mpe = _mpe_state(states)
    if world is None or mpe is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import animation

    agent_pos = np.asarray(mpe.agent_pos)[:num_frames]
    landmark_pos = np.asarray(mpe.landmark_pos)[:num_frames]
    names = env.unwrapped.agents
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    extent = max(1.5, float(np.abs(agent_pos).max()) + 0.2)
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    colours = ["tab:red" if name.startswith("adversary") else "tab:blue" for name in names]
    # Landmarks on top (they are often smaller than the agents covering them).
    landmarks = [
        plt.Circle((0, 0), float(size), color="0.2", alpha=0.6, zorder=3) for size in world.landmark_size
    ]
    agents = [
        plt.Circle((0, 0), float(size), color=c, alpha=0.85) for size, c in zip(world.agent_size, colours)
    ]
    for patch in landmarks + agents:
        ax.add_patch(patch)
    label = ax.set_title(title, fontsize=9)

    def draw(t):
        for patch, xy in zip(landmarks, landmark_pos[t]):
            patch.center = tuple(xy)
        for patch, xy in zip(agents, agent_pos[t]):
            patch.center = tuple(xy)
        label.set_text(f"{title}  t={t}")
        return landmarks + agents + [label]

    anim = animation.FuncAnimation(fig, draw, frames=num_frames, interval=1000 / fps, blit=False)
    anim.save(path, writer=animation.PillowWriter(fps=fps))
    plt.close(fig)
    return path
