"""MPE parity with mpe2 1.1.1, the reference semantics.

Open loop: mpe2's world is copied into our state ONCE after its reset; then both run the same random
actions for whole episodes with no re-sync, and every observation, reward, termination and truncation must
agree (1e-4), as must the episode length. mpe2 runs in numpy; each scenario config is jitted once (a
vmapped scan over all its episodes). Reset distributions are compared per entity type with a two-sample
Kolmogorov-Smirnov test, and the discrete choices (goals) with a chi-square test.
"""

from __future__ import annotations

import importlib
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxpar.envs as E
from jaxpar.envs.mpe import MPEState

EPISODES = 3  # per config and action kind; the last may start from a hand-made state (see CONFIGS)
TOL = 1e-4


def _landmark_index(world, landmark) -> int:
    return next(i for i, lm in enumerate(world.landmarks) if lm is landmark)


# mpe2 keeps the scenario's random choices as object references; these read them back as our `goal`.
GOALS = {
    "simple_adversary_v3": lambda w: [_landmark_index(w, w.agents[0].goal_a)],
    "simple_crypto_v3": lambda w: [_landmark_index(w, w.agents[0].goal_a), int(np.argmax(w.agents[2].key))],
    "simple_push_v3": lambda w: [w.agents[0].goal_a.index],
    "simple_reference_v3": lambda w: [_landmark_index(w, a.goal_b) for a in w.agents],
    "simple_speaker_listener_v4": lambda w: [_landmark_index(w, w.agents[0].goal_b)],
}


def _cover_landmarks(world):
    """Every agent on a landmark: simple_spread's success condition holds from the first step."""
    for agent, landmark in zip(world.agents, world.landmarks):
        agent.state.p_pos = landmark.state.p_pos + 0.01


def _catch_prey(world):
    """Every good agent touching an adversary: simple_tag's success condition holds from the first step."""
    adversaries = [a for a in world.agents if a.adversary]
    for i, agent in enumerate(a for a in world.agents if not a.adversary):
        agent.state.p_pos = adversaries[i % len(adversaries)].state.p_pos + 0.02


def _crowd(world):
    """Agents overlapping each other and the obstacles: strong contact forces from the first step."""
    anchor = world.landmarks[0].state.p_pos if world.landmarks else np.zeros(2)
    for i, agent in enumerate(world.agents):
        agent.state.p_pos = anchor + 0.03 * np.array([np.cos(i), np.sin(i)])


# (id, constructor kwargs, optional edit of mpe2's world after reset for the last episode)
CONFIGS = [
    ("simple_v3", {}, None),
    ("simple_v3", {"max_cycles": 7}, None),
    ("simple_adversary_v3", {}, None),
    ("simple_adversary_v3", {"N": 4, "num_agent_neighbors": 2, "num_landmark_neighbors": 3}, None),
    ("simple_crypto_v3", {}, None),
    ("simple_crypto_v3", {"max_cycles": 12}, None),
    ("simple_push_v3", {}, _crowd),
    ("simple_reference_v3", {"local_ratio": 0.2}, None),
    ("simple_speaker_listener_v4", {"max_cycles": 40}, None),
    ("simple_spread_v3", {}, _crowd),
    ("simple_spread_v3", {"N": 5, "local_ratio": 0.3, "max_cycles": 30}, None),
    ("simple_spread_v3", {"N": 4, "num_agent_neighbors": 2, "num_landmark_neighbors": 3}, None),
    ("simple_spread_v3", {"curriculum": True, "terminate_on_success": True}, _cover_landmarks),
    ("simple_tag_v3", {}, _crowd),
    ("simple_tag_v3", {"num_good": 3, "num_adversaries": 2, "num_obstacles": 3}, _crowd),
    ("simple_tag_v3", {"num_good": 2, "num_agent_neighbors": 2, "num_landmark_neighbors": 1}, None),
    ("simple_tag_v3", {"num_good": 2, "curriculum": True, "terminate_on_success": True}, _catch_prey),
    ("simple_world_comm_v3", {}, _crowd),
    (
        "simple_world_comm_v3",
        {
            "num_good": 3,
            "num_adversaries": 3,
            "num_obstacles": 2,
            "num_food": 3,
            "num_forests": 3,
            "max_cycles": 30,
        },
        None,
    ),
]


def make_reference(env_id: str, kwargs: dict, continuous: bool):
    module = importlib.import_module(f"mpe2.{env_id}")
    return module.parallel_env(continuous_actions=continuous, **kwargs)


def copy_state(ref) -> MPEState:
    """mpe2's world as our state, with numpy leaves (cheap to build by the hundred; jit takes them as is)."""
    world = ref.unwrapped.world
    name = ref.unwrapped.metadata["name"]
    A, L = len(world.agents), len(world.landmarks)
    return MPEState(
        agent_pos=np.array([a.state.p_pos for a in world.agents], np.float32),
        agent_vel=np.array([a.state.p_vel for a in world.agents], np.float32),
        landmark_pos=np.array([lm.state.p_pos for lm in world.landmarks], np.float32).reshape(L, 2),
        comm=np.array([a.state.c for a in world.agents], np.float32).reshape(A, -1),
        goal=np.array(GOALS.get(name, lambda w: [])(world), np.int32),
        t=np.int32(0),
    )


def random_actions(env, rng: np.random.Generator, steps: int) -> np.ndarray:
    """[steps, A, ...] actions in our padded layout. Continuous ones stray a little outside [0, 1] to
    exercise mpe2's clipping wrapper."""
    space = env.action_space
    if isinstance(space, E.spaces.Discrete):
        return rng.integers(0, space.n, size=(steps, *space.shape)).astype(np.int32)
    return (rng.uniform(-0.1, 1.1, size=(steps, *space.shape)) * space.mask).astype(np.float32)


def run_reference(ref, env, actions: np.ndarray):
    """Step mpe2 until its agents are gone; per step (obs [A, D] padded like ours, reward, term, trunc)."""
    names = ref.possible_agents
    dims = env.obs_dims
    out = {"obs": [], "reward": [], "terminated": [], "truncated": []}
    for t in range(actions.shape[0]):
        if not ref.agents:
            break
        if isinstance(env.action_space, E.spaces.Discrete):
            act = {n: int(actions[t, i]) for i, n in enumerate(names)}
        else:
            act = {n: actions[t, i, : ref.action_space(n).shape[0]] for i, n in enumerate(names)}
        obs, rew, term, trunc, _ = ref.step(act)
        padded = np.zeros(env.observation_space.shape, np.float32)
        for i, n in enumerate(names):
            padded[i, : dims[i]] = obs[n]
        out["obs"].append(padded)
        out["reward"].append([rew[n] for n in names])
        out["terminated"].append([term[n] for n in names])
        out["truncated"].append([trunc[n] for n in names])
    return {k: np.array(v) for k, v in out.items()}


def rollout_fn(env):
    """jit(vmap over episodes of (first observation, a scan over steps)) from initial states and actions."""

    def episode(state, actions):
        def body(state, a):
            obs, state, reward, terminated, truncated, _ = env.step(jax.random.key(0), state, a)
            return state, (obs, reward, terminated, truncated)

        return env.observations(state), jax.lax.scan(body, state, actions)[1]

    return jax.jit(jax.vmap(episode))


@pytest.mark.parametrize("continuous", [False, True], ids=["discrete", "continuous"])
@pytest.mark.parametrize(
    "env_id,kwargs,setup",
    CONFIGS,
    ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items()) or 'default'}" for c in CONFIGS],
)
def test_open_loop_parity_with_mpe2(env_id, kwargs, setup, continuous):
    env = E.make(env_id, continuous_actions=continuous, **kwargs)
    ref = make_reference(env_id, kwargs, continuous)
    rng = np.random.default_rng(zlib.crc32(f"{env_id}{kwargs}{continuous}".encode()))
    T = env.max_cycles + 2  # more actions than an episode can use: mpe2 must stop on its own
    states, actions, first, expected = [], [], [], []
    for episode in range(EPISODES):
        first_obs, _ = ref.reset(seed=int(rng.integers(2**31)))
        if setup is not None and episode == EPISODES - 1:
            setup(ref.unwrapped.world)
            first_obs = {n: ref.unwrapped.observe(n) for n in ref.possible_agents}
        first.append(first_obs)
        state = copy_state(ref)
        acts = random_actions(env, rng, T)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected.append(run_reference(ref, env, acts))
        states.append(state)
        actions.append(acts)
    batch = jax.tree.map(lambda *x: np.stack(x), *states)
    obs0, (obs, reward, terminated, truncated) = jax.device_get(rollout_fn(env)(batch, np.stack(actions)))
    for e, exp in enumerate(expected):
        for i, n in enumerate(ref.possible_agents):  # the copied state observes as mpe2's did
            np.testing.assert_allclose(
                obs0[e, i, : env.obs_dims[i]], first[e][n], atol=TOL, err_msg=f"first obs {n}"
            )
            np.testing.assert_array_equal(obs0[e, i, env.obs_dims[i] :], 0)
        done = np.any(terminated[e] | truncated[e], axis=-1)
        length = int(np.argmax(done)) + 1 if done.any() else T
        assert length == len(exp["reward"]), (
            f"episode {e}: {length} transitions, mpe2 had {len(exp['reward'])}"
        )
        ctx = f"{env_id} {kwargs} episode {e}"
        np.testing.assert_allclose(obs[e, :length], exp["obs"], atol=TOL, rtol=0, err_msg=f"obs {ctx}")
        np.testing.assert_allclose(
            reward[e, :length], exp["reward"], atol=TOL, rtol=0, err_msg=f"reward {ctx}"
        )
        np.testing.assert_array_equal(terminated[e, :length], exp["terminated"], err_msg=f"terminated {ctx}")
        np.testing.assert_array_equal(truncated[e, :length], exp["truncated"], err_msg=f"truncated {ctx}")
    if setup in (_cover_landmarks, _catch_prey):  # the hand-made state must actually terminate early
        assert expected[-1]["terminated"][-1].all() and len(expected[-1]["reward"]) < env.max_cycles


def test_mpe2_curriculum_stage_is_stuck_at_zero():
    """Why parity covers curriculum stage 0 only: in mpe2 1.1.1 BaseScenario's no-op `curriculum_stage`
    property setter swallows every stage change, so `set_curriculum_stage` does nothing. If this starts
    failing, mpe2 fixed it: add stage > 0 configs to CONFIGS."""
    ref = make_reference("simple_tag_v3", {"curriculum": True}, False)
    ref.unwrapped.set_curriculum_stage(2)
    assert ref.unwrapped.curriculum_stage == 0


@pytest.mark.parametrize(
    "env_id,curriculum_kwargs,full_kwargs",
    [
        ("simple_tag_v3", {"curriculum": True, "curriculum_stage": 2}, {}),
        ("simple_spread_v3", {"curriculum": True, "curriculum_stage": 1}, {}),
        ("simple_spread_v3", {"curriculum": True, "curriculum_stage": 0}, {"local_ratio": 0.0}),
    ],
)
def test_curriculum_stages_as_documented(env_id, curriculum_kwargs, full_kwargs):
    """The last stage is the full task. simple_spread's stage 0 drops the collision penalty: with the default
    local_ratio 0.5 its reward is half the global reward, i.e. that of local_ratio=0 scaled by 0.5."""
    staged, full = E.make(env_id, **curriculum_kwargs), E.make(env_id, **full_kwargs)

    @jax.jit
    def both(key):
        _, state = staged.reset(key)
        state = state.replace(agent_pos=state.agent_pos * 0.1)  # crowded: contacts and collisions
        actions = staged.action_space.sample(key)
        return staged.step(key, state, actions), full.step(key, state, actions)

    a, b = both(jax.random.key(3))
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    np.testing.assert_allclose(a[2], (0.5 if full_kwargs else 1.0) * b[2], atol=1e-6)
    assert np.any(a[2] != 0)
    slow = E.make("simple_tag_v3", curriculum=True)  # stage 0: prey at half speed and acceleration
    assert slow.world.max_speed[-1] == pytest.approx(0.65) and slow.world.accel[-1] == pytest.approx(2.0)


def test_default_episode_is_max_cycles_transitions():
    """25 transitions by default (JaxMARL's ports take 26): truncated on the 25th step, not before."""
    env = E.make("simple_spread_v3")
    obs, state = env.reset(jax.random.key(0))
    step = jax.jit(env.step)
    actions = jnp.zeros(env.action_space.shape, jnp.int32)
    for t in range(1, 26):
        obs, state, reward, terminated, truncated, _ = step(jax.random.key(t), state, actions)
        assert bool(truncated.all()) == (t == 25) and not terminated.any()


def _entity_groups(ref):
    """Indices of agents and of landmarks by type, the name's prefix (adversary, agent, food, forest, ...)."""
    world = ref.unwrapped.world
    groups = {}
    for kind, entities in (("agent", world.agents), ("landmark", world.landmarks)):
        for i, entity in enumerate(entities):
            prefix = entity.name.replace(" ", "_").rsplit("_", 1)[0]
            groups.setdefault((kind, prefix), []).append(i)
    return groups


RESET_CASES = [
    ("simple_adversary_v3", {"N": 3}),
    ("simple_crypto_v3", {}),
    ("simple_push_v3", {}),
    ("simple_reference_v3", {}),
    ("simple_speaker_listener_v4", {}),
    ("simple_spread_v3", {}),
    ("simple_tag_v3", {"num_good": 2, "num_obstacles": 3}),
    ("simple_world_comm_v3", {}),
]


@pytest.mark.parametrize("env_id,kwargs", RESET_CASES, ids=[c[0] for c in RESET_CASES])
def test_reset_distribution_matches_mpe2(env_id, kwargs):
    n = 500
    env = E.make(env_id, **kwargs)
    ours = jax.device_get(jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.key(7), n))[1])
    ref = make_reference(env_id, kwargs, False)
    theirs = []
    for seed in np.random.default_rng(0).integers(2**31, size=n):
        ref.reset(seed=int(seed))
        theirs.append(copy_state(ref))
    theirs = jax.tree.map(lambda *x: np.stack(x), *theirs)
    for (kind, prefix), idx in _entity_groups(ref).items():
        field = "agent_pos" if kind == "agent" else "landmark_pos"
        a, b = getattr(ours, field)[:, idx].ravel(), getattr(theirs, field)[:, idx].ravel()
        p = stats.ks_2samp(a, b).pvalue
        assert p > 1e-3, f"{env_id} {kind} {prefix!r} initial positions differ from mpe2 (KS p={p:.2g})"
    for g in range(ours.goal.shape[1]):
        size = env.goal_sizes[g]
        table = [np.bincount(ours.goal[:, g], minlength=size), np.bincount(theirs.goal[:, g], minlength=size)]
        p = stats.chi2_contingency(table).pvalue
        assert p > 1e-3, f"{env_id} goal {g} frequencies differ from mpe2: {table} (p={p:.2g})"
    np.testing.assert_array_equal(ours.agent_vel, 0)
    np.testing.assert_array_equal(ours.comm, 0)
