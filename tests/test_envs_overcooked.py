"""Overcooked against overcooked-ai 1.1.0 itself: open-loop episodes on every layout, two per layout (a
goal-directed cook with random slips, so soups are filled, cooked, carried, dropped and delivered, and
uniform random actions), compared at every step: positions, orientations, held objects, every object on
counters and in pots with its ingredients and cooking tick, sparse and shaped rewards per agent, and the
lossless state encoding. Plus: a hand-written cramped_room plan that delivers a soup in both, the batched
step against the single one, and the sharded runtime on 1 and 8 devices."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from overcooked_ai_py.mdp import overcooked_mdp as mdp_module
from overcooked_ai_py.mdp.actions import Action

import jaxpar.envs as E
from jaxpar.config import MeshConfig
from jaxpar.envs.overcooked import LAYOUTS
from jaxpar.envs.overcooked.overcooked import DIRECTIONS, DISH, INTERACT, NOTHING, ONION, SOUP, STAY, TOMATO
from jaxpar.envs.runtime import EnvRuntime
from jaxpar.envs.wrappers import env_keys
from lm_testing import config_mesh

OvercookedGridworld = mdp_module.OvercookedGridworld

KINDS = {"onion": ONION, "tomato": TOMATO, "dish": DISH, "soup": SOUP}
# Layout -> (max_steps, non-default shaping or None); one layout runs the constructor's other arguments.
CASES = {name: (400, None) for name in LAYOUTS}
CASES["counter_circuit_o_1order"] = (300, {"PLACEMENT_IN_POT_REW": 1, "DISH_PICKUP_REWARD": 2})
N, S, EAST, W = 0, 1, 2, 3
# forced_coordination: player 2 takes an onion and puts it on the middle counter both players face; then,
# both interacting every step, player 1 takes it, and in one step player 1 puts it back and player 2 takes
# it (interactions resolve player 1 first, on one state).
HANDOFF = [
    (S, W),
    (W, INTERACT),
    (STAY, EAST),
    (INTERACT, INTERACT),
    (INTERACT, INTERACT),
    (INTERACT, INTERACT),
]
COEF = 0.5  # shaped_reward_coef: reward = team sparse reward + COEF * own shaped reward


def original_mdp(layout, shaping):
    # Recipe values and times are class-level state in overcooked-ai: build the mdp right before use.
    params = (
        {} if shaping is None else {"rew_shaping_params": {**mdp_module.BASE_REW_SHAPING_PARAMS, **shaping}}
    )
    return OvercookedGridworld.from_layout_name(layout, **params)


def state_arrays(mdp, state):
    """An original OvercookedState in the jaxpar state's layout (numpy, [x, y] grids)."""
    w, h = mdp.shape
    out = {
        "pos": np.array([p.position for p in state.players], np.int32),
        "ori": np.array([direction_index(p.orientation) for p in state.players], np.int32),
        "held": np.zeros(2, np.int32),
        "held_soup": np.zeros((2, 2), np.int32),
        "obj": np.zeros((w, h), np.int32),
        "soup": np.zeros((w, h, 2), np.int32),
        "tick": np.full((w, h), -1, np.int32),
        "t": np.int32(state.timestep),
    }
    for i, p in enumerate(state.players):
        if p.held_object is not None:
            out["held"][i] = KINDS[p.held_object.name]
            if p.held_object.name == "soup":
                out["held_soup"][i] = ingredient_counts(p.held_object)
    for (x, y), obj in state.objects.items():
        out["obj"][x, y] = KINDS[obj.name]
        if obj.name == "soup":
            out["soup"][x, y] = ingredient_counts(obj)
            out["tick"][x, y] = obj._cooking_tick
    return out


def direction_index(d):
    return Action.ALL_ACTIONS.index(d)


def ingredient_counts(soup):
    c = collections.Counter(soup.ingredients)
    return c["onion"], c["tomato"]


class Cook:
    """A goal-directed player on the original's state: fetch an ingredient, fill a pot, start it, fetch a
    dish, take the soup, serve it; what it cannot reach it puts on a counter the other player reaches.
    With probability `slip` it acts at random (drops, collisions, interacting with the wrong thing)."""

    def __init__(self, mdp, rng, slip=0.15):
        self.mdp, self.rng, self.slip = mdp, rng, slip
        self.floor = set(mdp.get_valid_player_positions())

    def distances(self, start, blocked=None):
        """BFS steps from `start` over floor cells, around the `blocked` cell (the other player)."""
        dist, queue = {start: 0, blocked: -1}, collections.deque([start])
        while queue:
            x, y = queue.popleft()
            for dx, dy in DIRECTIONS:
                nxt = (x + dx, y + dy)
                if nxt in self.floor and nxt not in dist:
                    dist[nxt] = dist[(x, y)] + 1
                    queue.append(nxt)
        del dist[blocked]
        return dist

    def reachable_cells(self, dist, cells):
        """(cost, floor cell next to it, direction facing it) for each cell reachable from `dist`."""
        out = []
        for cx, cy in cells:
            for d, (dx, dy) in enumerate(DIRECTIONS):
                stand = (cx - dx, cy - dy)
                if stand in dist:
                    out.append((dist[stand], stand, d, (cx, cy)))
        return out

    def targets(self, state, i):
        mdp, me, other = self.mdp, state.players[i], state.players[1 - i]
        pots = mdp.get_pot_states(state)
        counters = mdp.get_counter_objects_dict(state)
        empty_counters = mdp.get_empty_counter_locations(state)
        mine = self.distances(me.position, blocked=other.position)
        theirs = self.distances(other.position, blocked=me.position)
        shared = [
            c for c in empty_counters if self.reachable_cells(mine, [c]) and self.reachable_cells(theirs, [c])
        ]
        held = me.held_object.name if me.held_object is not None else None
        if held in ("onion", "tomato"):
            fillable = pots["empty"] + [p for k in (1, 2) for p in pots[f"{k}_items"]]
            return self.reachable_cells(mine, fillable) or self.reachable_cells(mine, shared)
        if held == "dish":
            return self.reachable_cells(mine, pots["ready"] + pots["cooking"]) or self.reachable_cells(
                mine, shared
            )
        if held == "soup":
            return self.reachable_cells(mine, mdp.get_serving_locations()) or self.reachable_cells(
                mine, shared
            )
        idle = [p for k in (1, 2, 3) for p in pots[f"{k}_items"]]
        startable = [p for p in idle if len(state.objects[p].ingredients) == 3 or self.rng.random() < 0.1]
        if startable and self.reachable_cells(mine, startable):
            return self.reachable_cells(mine, startable)
        dishes_held = sum(p.held_object is not None and p.held_object.name == "dish" for p in state.players)
        if (pots["ready"] or pots["cooking"]) and dishes_held == 0:
            found = self.reachable_cells(mine, mdp.get_dish_dispenser_locations() + counters["dish"])
            if found:
                return found
        sources = mdp.get_onion_dispenser_locations() + counters["onion"]
        if self.rng.random() < 0.5:
            sources += mdp.get_tomato_dispenser_locations() + counters["tomato"]
        return self.reachable_cells(mine, sources + counters["soup"]) or self.reachable_cells(
            mine, counters["dish"] + counters["onion"] + counters["tomato"]
        )

    def act(self, state, i):
        if self.rng.random() < self.slip:
            return int(self.rng.integers(6))
        me = state.players[i]
        options = self.targets(state, i)
        if not options:
            return STAY
        _, stand, face, _ = min(options, key=lambda o: (o[0], self.rng.random()))
        if me.position == stand:
            return INTERACT if direction_index(me.orientation) == face else face
        dist = self.distances(stand, blocked=state.players[1 - i].position)  # a shortest path to `stand`
        x, y = me.position
        moves = [
            d for d, (dx, dy) in enumerate(DIRECTIONS) if dist.get((x + dx, y + dy), 1e9) < dist[me.position]
        ]
        return int(self.rng.choice(moves))


def play_original(layout, shaping, actions=None, steps=0, seed=0):
    """Runs the original from its standard start state with the given joint actions, or with two Cooks
    choosing them: (actions [T, 2], states, sparse [T, 2], shaped [T, 2], obs [T + 1, 2, W*H*26])."""
    mdp = original_mdp(layout, shaping)
    horizon = CASES[layout][0]
    state = mdp.get_standard_start_state()
    cooks = None if actions is not None else [Cook(mdp, np.random.default_rng([seed, i])) for i in range(2)]
    taken, states, sparse, shaped = [], [], [], []
    obs = [np.stack(mdp.lossless_state_encoding(state, horizon=horizon)).reshape(2, -1)]
    for t in range(len(actions) if actions is not None else steps):
        joint = actions[t] if actions is not None else [cooks[i].act(state, i) for i in range(2)]
        state, info = mdp.get_state_transition(state, [Action.INDEX_TO_ACTION[a] for a in joint])
        taken.append(joint)
        states.append(state_arrays(mdp, state))
        sparse.append(info["sparse_reward_by_agent"])
        shaped.append(info["shaped_reward_by_agent"])
        obs.append(np.stack(mdp.lossless_state_encoding(state, horizon=horizon)).reshape(2, -1))
    stacked = {k: np.stack([s[k] for s in states]) for k in states[0]}
    return np.array(taken, np.int32), stacked, np.array(sparse), np.array(shaped), np.stack(obs)


def make_env(layout):
    max_steps, shaping = CASES[layout]
    return E.make(
        "overcooked", layout=layout, max_steps=max_steps, shaped_reward_coef=COEF, rew_shaping_params=shaping
    )


def play_jaxpar(env, actions_ETA):
    """Episodes (one per row of actions [E, T, 2]) from reset, one jitted scan vmapped over episodes."""

    def episode(actions_TA):
        obs, state = env.reset(jax.random.key(0))

        def body(state, a):
            obs, state, reward, terminated, truncated, info = env.step(None, state, a)
            return state, (obs, state, reward, terminated, truncated, info)

        return obs, jax.lax.scan(body, state, actions_TA)[1]

    return jax.device_get(jax.jit(jax.vmap(episode))(jnp.asarray(actions_ETA)))


@pytest.fixture(scope="module", params=sorted(CASES))
def episodes(request):
    """Per layout: a Cook episode and a uniform-random one, in the original and in jaxpar."""
    layout = request.param
    max_steps, shaping = CASES[layout]
    cooked = play_original(layout, shaping, steps=max_steps, seed=len(layout))
    rng = np.random.default_rng(len(layout))
    actions = rng.integers(0, 6, (max_steps, 2))
    if layout == "forced_coordination":
        actions[: len(HANDOFF)] = HANDOFF
    randomly = play_original(layout, shaping, actions=actions)
    env = make_env(layout)
    ours = play_jaxpar(env, np.stack([cooked[0], randomly[0]]))
    return layout, env, (cooked, randomly), ours


def test_episodes_equal_the_original(episodes):
    layout, env, originals, (obs0, (obs, state, reward, terminated, truncated, info)) = episodes
    for e, (_, ref_state, ref_sparse, ref_shaped, ref_obs) in enumerate(originals):
        for field, expected in ref_state.items():
            got = getattr(state, field)[e]
            for t in range(len(got)):  # the first differing step, not just "arrays differ"
                np.testing.assert_array_equal(
                    got[t], expected[t], err_msg=f"{layout} episode {e} {field} step {t}"
                )
        np.testing.assert_array_equal(info["sparse_reward_by_agent"][e], ref_sparse)
        np.testing.assert_array_equal(info["shaped_reward_by_agent"][e], ref_shaped)
        team = ref_sparse.sum(-1, keepdims=True)
        np.testing.assert_allclose(reward[e], team + COEF * ref_shaped, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(obs0[e], ref_obs[0])
        for t in range(len(obs[e])):
            np.testing.assert_array_equal(
                obs[e][t], ref_obs[t + 1], err_msg=f"{layout} episode {e} obs step {t}"
            )
        assert not terminated[e].any()
        assert truncated[e][:-1].sum() == 0 and truncated[e][-1].all()
        assert obs.dtype == np.float32 and env.observation_space.contains(obs[e][-1])


def test_episodes_cover_the_game(episodes):
    """The comparison above means something only if the episodes reach every mechanic."""
    layout, env, ((actions, ref_state, ref_sparse, ref_shaped, ref_obs), _), ours = episodes
    info = ours[1][5]
    delivered = info["soups_delivered"][0].sum()
    assert delivered >= 2 and ref_sparse.sum() > 0, f"{layout}: the cook delivered {delivered} soups"
    assert np.any(ref_state["tick"] >= 0), "no soup cooked"
    assert np.any(ref_state["held"] == SOUP) and np.any(ref_state["held"] == DISH)
    counter_objects = ref_state["obj"] * (env.terrain == 1)
    assert np.any(counter_objects != NOTHING), "nothing was ever put on a counter"
    assert len(np.unique(ref_shaped)) >= 3, "shaped rewards of several kinds"
    if layout == "forced_coordination":
        random_state = episodes[2][1][1]
        assert random_state["held"][3:6].tolist() == [[NOTHING, NOTHING], [ONION, NOTHING], [NOTHING, ONION]]
        assert random_state["obj"][3, 2, 2] == ONION and random_state["obj"][5, 2, 2] == NOTHING
    if layout == "counter_circuit":  # tomatoes, mixed recipes, and the bonus order's doubled value
        assert np.any(ref_state["held"] == TOMATO) and np.any(ref_state["soup"][..., 1] > 0)
        assert 2 * (21 + 13) in ref_sparse, "the bonus order (one onion, one tomato) was never served"


@pytest.fixture(scope="module")
def scripted():
    """A hand-written cramped_room plan: player 2 fills the pot with three onions; player 1 takes a dish
    while the full pot is not yet cooking (no shaped reward for that in 1.1.0: a full idle pot does not
    count as needing a dish); player 2 starts the pot; player 1 waits, takes the soup and serves it."""
    onion_trip = [(STAY, EAST), (STAY, INTERACT), (STAY, W), (STAY, N), (STAY, INTERACT), (STAY, EAST)]
    plan = onion_trip * 3 + [(S, W), (INTERACT, N), (STAY, INTERACT), (STAY, EAST)]  # dish, start, step away
    plan += [(N, STAY), (EAST, STAY), (N, STAY)] + [(STAY, STAY)] * 16
    plan += [(INTERACT, STAY), (S, STAY), (EAST, STAY), (S, STAY), (INTERACT, STAY)]
    actions = np.array(plan, np.int32)
    env = make_env("cramped_room")
    return env, actions, play_original("cramped_room", None, actions=actions), play_jaxpar(env, actions[None])


def test_scripted_cramped_room_delivers_a_soup(scripted):
    env, actions, (_, ref_state, ref_sparse, ref_shaped, ref_obs), ours = scripted
    assert ref_sparse[-1].tolist() == [20, 0] and ref_sparse[:-1].sum() == 0
    assert ref_shaped.sum(0).tolist() == [5, 9]  # soup pickup; three onions
    _, (obs, state, reward, *_, info) = ours
    np.testing.assert_array_equal(info["sparse_reward_by_agent"][0], ref_sparse)
    np.testing.assert_array_equal(info["shaped_reward_by_agent"][0], ref_shaped)
    np.testing.assert_array_equal(obs[0], ref_obs[1:])
    np.testing.assert_array_equal(state.tick[0], ref_state["tick"])
    assert info["soups_delivered"][0].sum() == 1 and reward[0][-1].tolist() == [20.0, 20.0]


def test_batched_step_equals_single_step(scripted):
    """jit(vmap(step)) over every state of the scripted episode equals the scan's next step."""
    env, actions, _, (_, (obs, state, reward, _, truncated, info)) = scripted
    states = jax.tree.map(lambda x: x[0, :-1], state)
    out = jax.jit(jax.vmap(env.step, in_axes=(None, 0, 0)))(None, states, actions[1:])
    expected = jax.tree.map(lambda x: x[0, 1:], (obs, state, reward, truncated, info))
    jax.tree.map(np.testing.assert_array_equal, (out[0], out[1], out[2], out[4], out[5]), expected)


def test_runtime_same_on_1_and_8_devices():
    """The sharded runtime (autoreset included: episodes of 6 steps) gives every env the same trajectory
    on one device and on eight."""
    env = E.make("overcooked", layout="coordination_ring", max_steps=6, shaped_reward_coef=COEF)
    num_envs, steps = 8, 16

    def policy(key, obs):  # env i's actions depend on i alone, not on how the batch is split
        return jax.vmap(env.action_space.sample)(env_keys(key, num_envs))

    def collect(obs, reward, terminated, truncated, info):
        return obs, reward, truncated, info["shaped_reward_by_agent"], info["final_obs"]

    def run(mesh):
        runtime = EnvRuntime(env, num_envs, mesh)
        obs, state = runtime.reset(jax.random.key(0))
        (_, state), out = runtime.rollout_fn(steps, policy, collect)(jax.random.key(1), obs, state)
        return jax.device_get((out, state))

    one = run(config_mesh(MeshConfig(), devices=jax.devices()[:1]))
    eight = run(config_mesh(MeshConfig(data=8)))
    jax.tree.map(np.testing.assert_array_equal, one, eight)
    assert one[0][2].any(), "the rollout should cross an episode boundary"


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="layout='cramped'"):
        E.make("overcooked", layout="cramped")
    with pytest.raises(ValueError, match="max_steps=0"):
        E.make("overcooked", max_steps=0)
    with pytest.raises(ValueError, match="'SOUP_REW'"):
        E.make("overcooked", rew_shaping_params={"SOUP_REW": 1})
