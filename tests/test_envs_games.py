"""Switch Riddle and Coin Game against small plain-Python/numpy reference implementations written from
the papers' rules. Randomness is exogenous to the references: the riddle's visiting schedule is read from
the reset state, the coin game's uniforms come from its documented `reset_draws` / `step_draws`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxpar.envs as E
from jaxpar.envs.coin_game.coin_game import reset_draws, step_draws
from jaxpar.envs.wrappers import env_keys


class ReferenceSwitchRiddle:
    """Foerster et al. 2016: one prisoner a day in the room; 0 bulb off, 1 bulb on, 2 tell."""

    def __init__(self, n, max_steps, schedule):
        self.n, self.max_steps, self.schedule = n, max_steps, [int(a) for a in schedule]
        self.day, self.bulb, self.visited = 0, False, {self.schedule[0]}

    def obs(self):
        who = self.schedule[min(self.day, self.max_steps - 1)]
        return np.array([[float(i == who), float(i == who and self.bulb)] for i in range(self.n)])

    def step(self, actions):
        action = int(actions[self.schedule[self.day]])
        told = action == 2
        reward = (1.0 if len(self.visited) == self.n else -1.0) if told else 0.0
        if not told:
            self.bulb = action == 1
        self.day += 1
        if self.day < self.max_steps:
            self.visited.add(self.schedule[self.day])
        return (
            self.obs(),
            [reward] * self.n,
            [told] * self.n,
            [not told and self.day >= self.max_steps] * self.n,
        )


class ReferenceCoinGame:
    """Lerer & Peysakhovich 2017: two agents on a torus; +1 for any coin picked, -2 to the owner of a coin the
    other picked; a picked coin respawns with a random colour on a free cell."""

    MOVES = [(0, 1), (0, -1), (1, 0), (-1, 0)]

    def __init__(self, grid, max_steps, u):
        self.g, self.max_steps, self.t = grid, max_steps, 0
        cells = grid * grid
        red = min(int(u[0] * cells), cells - 1)
        blue = self.free_cell(u[1], {red})
        self.pos = [divmod(red, grid), divmod(blue, grid)]
        self.coin = divmod(self.free_cell(u[2], {red, blue}), grid)
        self.owner = int(u[3] >= 0.5)

    def free_cell(self, u, taken):
        free = [c for c in range(self.g * self.g) if c not in taken]
        return free[min(int(u * len(free)), len(free) - 1)]

    def obs(self):
        out = []
        for me in (0, 1):
            planes = np.zeros((4, self.g, self.g))
            planes[0][self.pos[me]] = 1
            planes[1][self.pos[1 - me]] = 1
            planes[2 if self.owner == me else 3][self.coin] = 1
            out.append(planes.ravel())
        return np.array(out)

    def step(self, actions, u):
        self.pos = [
            ((r + self.MOVES[a][0]) % self.g, (c + self.MOVES[a][1]) % self.g)
            for (r, c), a in zip(self.pos, actions)
        ]
        reward = [0.0, 0.0]
        picked = False
        for i in (0, 1):
            if self.pos[i] == self.coin:
                picked = True
                reward[i] += 1
                if self.owner != i:
                    reward[self.owner] -= 2
        if picked:
            taken = {r * self.g + c for r, c in self.pos}
            self.coin = divmod(self.free_cell(u[0], taken), self.g)
            self.owner = int(u[1] >= 0.5)
        self.t += 1
        return self.obs(), reward, [False, False], [self.t >= self.max_steps] * 2


def run_batch(env, num_envs, steps, seed, sample=None):
    """Per-step keys, actions and outputs of num_envs envs under one jitted scan (no autoreset);
    `sample(key)` draws one env's actions (the action space's uniform sampler by default)."""
    sample = sample or env.action_space.sample

    @jax.jit
    def run(key):
        k_reset, k_steps = jax.random.split(key)
        reset_keys = env_keys(k_reset, num_envs)
        obs0, state0 = jax.vmap(env.reset)(reset_keys)

        def body(state, key):
            k_act, k_env = jax.random.split(key)
            actions = jax.vmap(sample)(env_keys(k_act, num_envs))
            step_keys = env_keys(k_env, num_envs)
            obs, state, reward, terminated, truncated, _ = jax.vmap(env.step)(step_keys, state, actions)
            return state, (step_keys, actions, obs, reward, terminated, truncated)

        _, out = jax.lax.scan(body, state0, jax.random.split(k_steps, steps))
        return reset_keys, obs0, state0, out

    return run(jax.random.key(seed))


@pytest.mark.parametrize("num_agents,max_steps", [(3, None), (4, 12)])
def test_switch_riddle_matches_reference(num_agents, max_steps):
    env = E.make("switch_riddle", num_agents=num_agents, max_steps=max_steps)

    def sample(key):  # tell on 8% of days, so episodes end early, late, and at the time limit
        k_bulb, k_tell = jax.random.split(key)
        return jnp.where(
            jax.random.uniform(k_tell, (num_agents,)) < 0.08,
            2,
            jax.random.randint(k_bulb, (num_agents,), 0, 2),
        )

    _, obs0, state0, (_, actions, obs, reward, terminated, truncated) = jax.device_get(
        run_batch(env, 64, env.max_steps, num_agents, sample)
    )
    lengths = []
    for e in range(64):
        ref = ReferenceSwitchRiddle(num_agents, env.max_steps, state0.schedule[e])
        np.testing.assert_array_equal(obs0[e], ref.obs())
        for t in range(env.max_steps):
            r_obs, r_rew, r_term, r_trunc = ref.step(actions[t, e])
            np.testing.assert_array_equal(obs[t, e], r_obs, err_msg=f"env {e} day {t}")
            np.testing.assert_array_equal(reward[t, e], r_rew)
            np.testing.assert_array_equal(terminated[t, e], r_term)
            np.testing.assert_array_equal(truncated[t, e], r_trunc)
            if r_term[0] or r_trunc[0]:
                lengths.append(t + 1)
                break
    assert {1, env.max_steps} <= set(lengths) and reward.max() == 1 and reward.min() == -1
    counts = np.bincount(np.asarray(state0.schedule).ravel(), minlength=num_agents)
    assert stats.chisquare(counts).pvalue > 1e-3, f"the schedule should be uniform over prisoners: {counts}"


def test_switch_riddle_telling_after_everyone_visited_wins():
    env = E.make("switch_riddle", num_agents=2, max_steps=5)
    _, state = env.reset(jax.random.key(0))
    state = state.replace(schedule=np.array([0, 1, 1, 0, 0], np.int32), has_been=np.array([True, False]))
    tell = np.full(2, 2, np.int32)
    assert float(env.step(None, state, tell)[2][0]) == -1.0  # only prisoner 0 has been in
    _, state, *_ = env.step(None, state, np.ones(2, np.int32))  # bulb on; prisoner 1 comes in
    obs, _, reward, terminated, *_ = env.step(None, state, tell)
    assert float(reward[0]) == 1.0 and terminated.all()


@pytest.mark.parametrize("grid,max_steps", [(3, 30), (4, 20)])
def test_coin_game_matches_reference(grid, max_steps):
    env = E.make("coin_game", grid_size=grid, max_steps=max_steps)
    reset_keys, obs0, _, (step_keys, actions, obs, reward, terminated, truncated) = run_batch(
        env, 32, max_steps, 5
    )
    reset_u = np.asarray(jax.vmap(reset_draws)(reset_keys))
    step_u = np.asarray(jax.vmap(jax.vmap(step_draws))(step_keys))
    obs0, actions, obs, reward, terminated, truncated = jax.device_get(
        (obs0, actions, obs, reward, terminated, truncated)
    )
    picked_other = 0
    for e in range(32):
        ref = ReferenceCoinGame(grid, max_steps, reset_u[e])
        np.testing.assert_array_equal(obs0[e], ref.obs())
        for t in range(max_steps):
            r_obs, r_rew, r_term, r_trunc = ref.step(actions[t, e], step_u[t, e])
            np.testing.assert_array_equal(obs[t, e], r_obs, err_msg=f"env {e} step {t}")
            np.testing.assert_array_equal(reward[t, e], r_rew, err_msg=f"env {e} step {t}")
            np.testing.assert_array_equal(terminated[t, e], r_term)
            np.testing.assert_array_equal(truncated[t, e], r_trunc)
            picked_other += min(r_rew) <= -1
    assert picked_other > 0 and reward.max() >= 1
