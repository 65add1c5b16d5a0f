"""Hanabi against DeepMind's hanabi-learning-environment 0.0.4 (`rl_env`, the C++ game behind it).

Whole games are played in the original with seeded deals and seeded moves drawn from its legal list; the
deals it made (its move history) become the deck order of the jax game, which then replays the same
moves. At every step: legal moves (as uids), the canonical observation of every player, reward, score,
tokens, fireworks, deck size and the end of the game must be equal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hanabi_learning_environment import pyhanabi, rl_env

import jaxpar.envs as E
from jaxpar.config import MeshConfig
from jaxpar.envs.hanabi import Hanabi
from jaxpar.envs.runtime import EnvRuntime
from jaxpar.envs.wrappers import env_keys
from lm_testing import config_mesh

GAMES = ((0, "random"), (3, "careful"), (7, "careful"))  # (seed, move style) per configuration


def full_config(num_players: int) -> dict:
    """rl_env.make("Hanabi-Full", num_players)'s game, with a fixed seed for its deals."""
    return {
        "colors": 5,
        "ranks": 5,
        "players": num_players,
        "max_information_tokens": 8,
        "max_life_tokens": 3,
        "observation_type": pyhanabi.AgentObservationType.CARD_KNOWLEDGE.value,
    }


def pick_move(rng, state, legal: list[int], game, style: str) -> int:
    """A move from the original's legal list: uniform ("random"), or one that usually plays a playable
    card and otherwise hints or discards ("careful", so games reach the empty deck and full fireworks)."""
    if style == "random":
        return int(rng.choice(legal))
    hand = state.player_hands()[state.cur_player()]
    fireworks = state.fireworks()
    plays = [u for u in legal if game.get_move(u).type() == pyhanabi.HanabiMoveType.PLAY]
    good = [
        u
        for u in plays
        if fireworks[hand[game.get_move(u).card_index()].color()]
        == hand[game.get_move(u).card_index()].rank()
    ]
    if good and rng.random() < 0.8:
        return int(rng.choice(good))
    others = [u for u in legal if u not in plays]
    if others and rng.random() < 0.95:
        return int(rng.choice(others))
    return int(rng.choice(legal))


def play_reference(config: dict, seed: int, style: str) -> dict:
    """One whole game of the original: its deal order, the moves, and what it shows at every step."""
    env = rl_env.HanabiEnv({**config, "seed": seed})
    game = env.game
    rng = np.random.default_rng(seed)
    obs = env.reset()
    keys = ("obs", "legal", "cur", "score", "info", "life", "fireworks", "deck_left", "reward", "done")
    rec = {k: [] for k in keys}

    def record(obs, reward, done):
        players = obs["player_observations"]
        rec["obs"].append([p["vectorized"] for p in players])
        rec["cur"].append(obs["current_player"])
        rec["legal"].append(players[obs["current_player"]]["legal_moves_as_int"])
        rec["score"].append(env.state.score())
        rec["info"].append(env.state.information_tokens())
        rec["life"].append(env.state.life_tokens())
        rec["fireworks"].append(env.state.fireworks())
        rec["deck_left"].append(env.state.deck_size())
        rec["reward"].append(reward)
        rec["done"].append(done)

    record(obs, 0, False)
    moves, done = [], False
    while not done:
        move = pick_move(rng, env.state, rec["legal"][-1], game, style)
        obs, reward, done, _ = env.step(move)
        moves.append(move)
        record(obs, reward, done)
    dealt = [
        item.move().color() * config["ranks"] + item.move().rank()
        for item in env.state.move_history()
        if item.move().type() == pyhanabi.HanabiMoveType.DEAL
    ]
    counts = [game.num_cards(c, r) for c in range(config["colors"]) for r in range(config["ranks"])]
    undealt = np.repeat(np.arange(len(counts)), counts).tolist()
    for card in dealt:
        undealt.remove(card)
    return {"deck": np.array(dealt + undealt, np.int32), "moves": np.array(moves, np.int32), **rec}


def replay(env: Hanabi, decks: np.ndarray, moves: np.ndarray):
    """The jax game from each deck under each move sequence (padded moves after the end change nothing):
    per step [G, T+1, ...] observations, current player's legal moves, score, tokens, fireworks, ..."""

    def one(deck, moves):
        obs, state = env.reset_with_deck(deck)

        def view(obs, state):
            return {
                "obs": obs,
                "legal": env.legal_actions(state)[state.cur_player],
                "cur": state.cur_player,
                "score": env.score(state),
                "info": state.info_tokens,
                "life": state.life_tokens,
                "fireworks": state.fireworks,
                "deck_left": env.deck_size - state.dealt,
            }

        def body(state, move):
            actions = jnp.zeros((env.num_players,), jnp.int32).at[state.cur_player].set(move)
            obs, state, reward, terminated, _, _ = env.step(None, state, actions)
            return state, {**view(obs, state), "reward": reward, "done": terminated}

        first = {
            **view(obs, state),
            "reward": jnp.zeros((env.num_players,)),
            "done": jnp.zeros((env.num_players,), bool),
        }
        _, rest = jax.lax.scan(body, state, moves)
        return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)

    return jax.device_get(jax.jit(jax.vmap(one))(decks, moves))


CONFIGS = {
    "2p": full_config(2),
    "3p": full_config(3),
    "4p": full_config(4),
    "5p": full_config(5),
    # Not Hanabi-Full: a small game that the careful policy completes (the full-fireworks ending).
    "3p-small": {
        **full_config(3),
        "colors": 2,
        "ranks": 3,
        "hand_size": 2,
        "max_information_tokens": 3,
        "max_life_tokens": 1,
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_whole_games_match_the_original(name):
    config = CONFIGS[name]
    games = [play_reference(config, seed, style) for seed, style in GAMES]
    env = Hanabi(
        num_players=config["players"],
        colors=config["colors"],
        ranks=config["ranks"],
        hand_size=config.get("hand_size"),
        max_information_tokens=config["max_information_tokens"],
        max_life_tokens=config["max_life_tokens"],
    )
    assert env.obs_dim == rl_env.HanabiEnv({**config, "seed": 0}).vectorized_observation_shape()[0]
    assert env.num_moves == rl_env.HanabiEnv({**config, "seed": 0}).num_moves()
    T = max(len(g["moves"]) for g in games)
    moves = np.stack([np.pad(g["moves"], (0, T - len(g["moves"]))) for g in games])
    ours = replay(env, np.stack([g["deck"] for g in games]), moves)
    endings = set()
    for g, ref in enumerate(games):
        n = len(ref["moves"])
        assert n <= env.max_steps
        np.testing.assert_array_equal(ours["obs"][g, : n + 1], np.array(ref["obs"], np.float32))
        for t in range(n):  # legal moves where a player is to move (the original lists them at the end too)
            np.testing.assert_array_equal(
                np.flatnonzero(ours["legal"][g, t]), ref["legal"][t], err_msg=f"step {t}"
            )
        for key in ("cur", "score", "info", "life", "fireworks", "deck_left"):
            np.testing.assert_array_equal(ours[key][g, : n + 1], np.array(ref[key]), err_msg=key)
        np.testing.assert_array_equal(
            ours["reward"][g, : n + 1], np.repeat(np.array(ref["reward"])[:, None], env.num_players, 1)
        )
        np.testing.assert_array_equal(
            ours["done"][g, : n + 1], np.repeat(np.array(ref["done"])[:, None], env.num_players, 1)
        )
        # After the end nothing changes.
        assert np.all(ours["done"][g, n:]) and np.all(ours["score"][g, n:] == ref["score"][-1])
        np.testing.assert_array_equal(ours["reward"][g, n + 1 :], 0)
        endings.add(
            "lives"
            if ref["life"][-1] == 0
            else "fireworks"
            if ref["score"][-1] == config["colors"] * config["ranks"]
            else "deck"
        )
    expected = {"lives", "fireworks"} if name == "3p-small" else {"lives", "deck"}
    assert expected <= endings, f"the games should cover the endings {expected}, got {endings}"


def random_legal(env, key, state):
    """[B, A]: a uniformly random legal action per env and agent, env i drawing with fold_in(key, i)."""
    legal = jax.vmap(env.legal_actions)(state)
    keys = env_keys(key, legal.shape[0])
    return jax.vmap(lambda k, ok: jax.random.categorical(k, jnp.where(ok, 0.0, -jnp.inf)))(keys, legal)


def test_runtime_batch_equals_single_games_on_1_and_8_devices():
    """EnvRuntime's jitted, vmapped batch (autoreset, random legal moves) gives the same games on 1 device
    and on 8, and each env's game equals that env played alone (AutoReset, the same keys and moves)."""
    env = E.make("hanabi", num_players=2)
    num_envs, steps = 16, 30
    pick = jax.jit(lambda key, state: random_legal(env, key, state))

    def games(mesh):
        runtime = EnvRuntime(env, num_envs, mesh)
        obs, state = runtime.reset(jax.random.key(0))
        out = []
        for t in range(steps):
            actions = pick(jax.random.key(100 + t), state)
            obs, state, reward, terminated, _, info = runtime.step(jax.random.key(t), state, actions)
            out.append(jax.device_get((actions, obs, reward, terminated, info["final_obs"])))
        return [np.stack(x) for x in zip(*out)]  # each [T, B, ...]

    one = games(config_mesh(MeshConfig(), devices=jax.devices()[:1]))
    eight = games(config_mesh(MeshConfig(data=4, fsdp=2)))
    jax.tree.map(np.testing.assert_array_equal, one, eight)
    assert one[3].any(), "the games should cross an episode boundary (autoreset)"

    @jax.jit
    def alone(reset_key, step_keys, actions):
        single = E.wrappers.AutoReset(env)
        _, state = single.reset(reset_key)

        def body(state, key_actions):
            key, actions = key_actions
            obs, state, reward, terminated, _, info = single.step(key, state, actions)
            return state, (obs, reward, terminated, info["final_obs"])

        return jax.lax.scan(body, state, (step_keys, actions))[1]

    reset_keys = env_keys(jax.random.key(0), num_envs)
    step_keys = jnp.stack([env_keys(jax.random.key(t), num_envs) for t in range(steps)])  # [T, B]
    for i in range(num_envs):
        by_itself = jax.device_get(alone(reset_keys[i], step_keys[:, i], one[0][:, i]))
        jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a[:, i], b), one[1:], list(by_itself))


def test_legal_actions_and_arguments():
    env = E.make("hanabi", num_players=3)
    _, state = jax.jit(env.reset)(jax.random.key(0))
    legal = np.asarray(env.legal_actions(state))
    assert legal.shape == (3, env.num_moves) == (3, 30)
    # Player 0 to move with 8 tokens: no discard, every play; the others have the one placeholder.
    assert not legal[0, :5].any() and legal[0, 5:10].all()
    np.testing.assert_array_equal(legal[1:], np.eye(1, env.num_moves, dtype=bool).repeat(2, 0))
    # Off-turn actions are ignored; an illegal move is replaced by the lowest-uid legal one (play 0).
    step = jax.jit(env.step)
    a = step(None, state, jnp.array([0, 7, 7]))  # discard 0 is illegal at 8 tokens
    b = step(None, state, jnp.array([5, 0, 0]))
    jax.tree.map(np.testing.assert_array_equal, a[:5], b[:5])
    assert env.hand_size == 5 and E.make("hanabi", num_players=4).hand_size == 4
    # Environments without rules allow every action of their Discrete space.
    coin = E.make("coin_game")
    assert np.asarray(coin.legal_actions(coin.reset(jax.random.key(0))[1])).all()
    with pytest.raises(ValueError, match="num_players=6"):
        E.make("hanabi", num_players=6)
    with pytest.raises(ValueError, match="hand_size=11"):
        E.make("hanabi", num_players=5, hand_size=11)


def test_ppo_samples_and_learns_only_legal_moves():
    """PPO masks Hanabi's illegal moves: every sampled action is legal, off-turn players' one placeholder
    action has log-probability 0, and the loss sees the same masks (its entropy is that of the legal
    moves only, far below the log(20) of an unmasked near-uniform policy). Envs without rules: no mask."""
    from configs import marl
    from jaxpar.rl import loop
    from jaxpar.rl.config import from_config_dict
    from jaxpar.rl.ppo import has_legal_actions
    from jaxpar.rl.rollout import collect

    raw = marl.get_config("smoke").to_dict()
    raw["env"] = {**raw["env"], "id": "hanabi", "kwargs": {"num_players": 2}, "num_envs": 16}
    raw["algo"] = {**raw["algo"], "num_steps": 40, "update_epochs": 1}
    raw["train"] = {**raw["train"], "total_env_steps": 16 * 40 * 2}
    ppo = loop.build(from_config_dict(raw), jax.devices()[:1])
    assert ppo.legal_actions is not None and not has_legal_actions(E.make("simple_spread_v3"))
    state = jax.tree.map(lambda x: x[0], ppo.init_states())

    @jax.jit
    def rollout_and_update(state):
        sample = lambda k, logits: jax.random.categorical(k, logits).astype(jnp.int32)
        params, key = state.train.params, jax.random.key(1)
        traj = collect(ppo.vec, ppo.policy_step, params, state.rollout, key, 40, sample, ppo.legal_actions)[1]
        return traj, ppo.update(state)[1]

    traj, metrics = jax.device_get(rollout_and_update(state))
    chosen_legal = np.take_along_axis(traj.legal, traj.actions[..., None], -1)[..., 0]
    assert chosen_legal.all()
    current = traj.legal.sum(-1) > 1  # [T, E, A]: the player to move
    assert not traj.legal[current].all(), "some moves should have been illegal to the player to move"
    assert np.all(traj.log_probs[~current] == 0.0)
    assert traj.episode_done.any(), "the rollout should finish some games"
    assert np.isfinite(metrics["policy_loss"]) and 0 < metrics["entropy"] < 0.5 * np.log(20)
