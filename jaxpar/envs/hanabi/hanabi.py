"""Hanabi, exact to DeepMind's hanabi-learning-environment 0.0.4 (`rl_env.make("Hanabi-Full")`).

The rules, the move list and the canonical observation encoding are the original's:

- Moves in the original's uid order (`HanabiGame.get_move_uid`), h = hand size, p = players, c = colors,
  r = ranks: discard card 0..h-1, play card 0..h-1, reveal color (target offset 1..p-1, then color),
  reveal rank (target offset 1..p-1, then rank); p = 2 in Hanabi-Full gives 20 moves.
- Turn-based: every agent submits an action each step, only the current player's counts; the others'
  are ignored. `legal_actions(state)` [p, num_moves] gives the current player's legal moves and, for
  every other player, exactly one legal action (0, a placeholder that is ignored): a masked policy then
  has log-probability 0 and entropy 0 off-turn. An illegal action of the current player is replaced by
  the lowest-uid legal move (policies are meant to mask; this only keeps the game well defined).
- Chance is a deck order: `reset(key)` shuffles the deck uniformly (the same distribution as the
  original's card-by-card draws), and `reset_with_deck(deck)` starts from a given deal order, which is
  how the tests replay the original's deals. Hands are dealt player 0 first; a played or discarded card
  leaves its slot, the newer cards shift down and the replacement goes last, as in the original.
- Observation [p, obs_dim]: the canonical encoding (hands of the others, board, discards, last action,
  card knowledge; 658 entries for 2 players) of each player from its own seat, bit for bit.
- Reward (every agent): the change in score, `rl_env`'s reward. The score is the sum of the fireworks,
  and 0 once the life tokens are gone, so losing the last life gives minus the score so far.
- The game ends (`terminated` for every agent) when the life tokens are gone, every firework is
  complete, or one last round after the deck ran out. No time limit: every game ends within
  `max_steps` moves (a bound from the token and card counts). Stepping a finished game changes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxpar.envs import spaces
from jaxpar.envs.core import MultiAgentEnv
from jaxpar.envs.registry import register

PLAY, DISCARD, REVEAL_COLOR, REVEAL_RANK = 0, 1, 2, 3  # the encoding's move-type order


@struct.dataclass
class HanabiState:
    deck: jax.Array  # [deck_size] int32 cards (color * ranks + rank) in deal order
    dealt: jax.Array  # int32: cards dealt so far (deck[dealt:] is the undealt deck)
    hands: jax.Array  # [p, h] int32 cards, oldest first, -1 past the hand's end
    color_plausible: jax.Array  # [p, h, c] bool: common knowledge of each card's color
    rank_plausible: jax.Array  # [p, h, r] bool
    color_hint: jax.Array  # [p, h] int32: the color revealed for this card, -1 if none
    rank_hint: jax.Array  # [p, h] int32
    fireworks: jax.Array  # [c] int32: cards played per color
    discards: jax.Array  # [c * r] int32: discarded (or misplayed) copies of each card
    info_tokens: jax.Array  # int32
    life_tokens: jax.Array  # int32
    cur_player: jax.Array  # int32
    turns_to_play: jax.Array  # int32: moves left once the deck is empty
    last_player: jax.Array  # int32: who made the last move, -1 before the first
    last_type: jax.Array  # int32: PLAY, DISCARD, REVEAL_COLOR or REVEAL_RANK
    last_target: jax.Array  # int32: the revealed-to player (absolute) of a reveal
    last_value: jax.Array  # int32: the revealed color or rank
    last_revealed: jax.Array  # [h] bool: the cards a reveal touched
    last_index: jax.Array  # int32: the hand slot a play or discard took
    last_card: jax.Array  # int32: the card played or discarded
    last_scored: jax.Array  # bool: the play added to a firework
    last_info: jax.Array  # bool: the play or discard returned an information token


@register("hanabi")
class Hanabi(MultiAgentEnv):
    def __init__(
        self,
        num_players: int = 2,
        colors: int = 5,
        ranks: int = 5,
        hand_size: int | None = None,
        max_information_tokens: int = 8,
        max_life_tokens: int = 3,
    ):
        if not 2 <= num_players <= 5:
            raise ValueError(f"num_players={num_players} must be 2 to 5, as in hanabi-learning-environment.")
        if not 1 <= colors <= 5:
            raise ValueError(f"colors={colors} must be 1 to 5.")
        if not 1 <= ranks <= 5:
            raise ValueError(f"ranks={ranks} must be 1 to 5.")
        hand_size = (5 if num_players < 4 else 4) if hand_size is None else hand_size
        instances = np.array([3 if r == 0 else 1 if r == ranks - 1 else 2 for r in range(ranks)])
        deck_size = colors * int(instances.sum())
        if not 1 <= hand_size <= 8 or hand_size * num_players > deck_size:
            raise ValueError(
                f"hand_size={hand_size} must be 1 to 8 and leave num_players * hand_size <= {deck_size} "
                f"cards in the deck; leave it None for the rules' size (5 for 2-3 players, else 4)."
            )
        if max_information_tokens < 1:
            raise ValueError(f"max_information_tokens={max_information_tokens} must be >= 1.")
        if max_life_tokens < 1:
            raise ValueError(f"max_life_tokens={max_life_tokens} must be >= 1.")
        P, C, R, H = num_players, colors, ranks, hand_size
        self.num_players, self.colors, self.ranks, self.hand_size = P, C, R, H
        self.max_information_tokens, self.max_life_tokens = max_information_tokens, max_life_tokens
        self.deck_size = deck_size
        self.num_moves = 2 * H + (P - 1) * (C + R)
        # Longest game: plays/discards before the deck runs out, hints paid by the starting tokens and
        # one token per discard or completed firework, and the last round.
        self.max_steps = 2 * (deck_size - P * H) + P + max_information_tokens + C
        # The deck's cards by instance (color-major, rank, copy), and the discard thermometer's layout.
        self._instance_card = np.repeat(np.arange(C * R), np.tile(instances, C)).astype(np.int32)
        self._instance_copy = np.concatenate([np.arange(n) for n in np.tile(instances, C)]).astype(np.int32)
        self.obs_dim = (
            (P - 1) * H * C * R
            + P  # hands
            + (deck_size - P * H)
            + C * R
            + max_information_tokens
            + max_life_tokens  # board
            + deck_size  # discards
            + P
            + 4
            + P
            + C
            + R
            + H
            + H
            + C * R
            + 2  # last action
            + P * H * (C * R + C + R)  # card knowledge
        )
        self.agents = tuple(f"player_{i}" for i in range(P))
        self.observation_space = spaces.Box(0.0, 1.0, (P, self.obs_dim))
        self.action_space = spaces.Discrete(self.num_moves, shape=(P,))

    # --- moves ----------------------------------------------------------------------------------------

    def decode_move(self, uid: jax.Array):
        """(type, card index, target offset, color or rank) of a move uid, as `HanabiGame.get_move`."""
        H, C, R, P = self.hand_size, self.colors, self.ranks, self.num_players
        hint = uid - 2 * H
        rank_hint = hint - (P - 1) * C
        move_type = jnp.where(
            uid < H,
            DISCARD,
            jnp.where(uid < 2 * H, PLAY, jnp.where(hint < (P - 1) * C, REVEAL_COLOR, REVEAL_RANK)),
        )
        index = jnp.where(uid < H, uid, uid - H)
        offset = 1 + jnp.where(move_type == REVEAL_COLOR, hint // C, rank_hint // R)
        value = jnp.where(move_type == REVEAL_COLOR, hint % C, rank_hint % R)
        return move_type, index, offset, value

    def _current_legal(self, state: HanabiState) -> jax.Array:
        """[num_moves] bool: the current player's legal moves (`HanabiState.legal_moves`)."""
        P, C, R = self.num_players, self.colors, self.ranks
        num_cards = jnp.sum(state.hands[state.cur_player] >= 0)
        slots = jnp.arange(self.hand_size) < num_cards
        discard = slots & (state.info_tokens < self.max_information_tokens)
        targets = (state.cur_player + jnp.arange(1, P)) % P
        target_hands = state.hands[targets]  # [p-1, h]
        valid = target_hands >= 0
        has_color = jnp.any(valid[..., None] & (target_hands[..., None] // R == jnp.arange(C)), axis=1)
        has_rank = jnp.any(valid[..., None] & (target_hands[..., None] % R == jnp.arange(R)), axis=1)
        can_hint = state.info_tokens > 0
        return jnp.concatenate(
            [discard, slots, (has_color & can_hint).reshape(-1), (has_rank & can_hint).reshape(-1)]
        )

    def legal_actions(self, state: HanabiState) -> jax.Array:
        """[p, num_moves] bool: the current player's legal moves; one placeholder (0) for the others."""
        others = jnp.zeros((self.num_players, self.num_moves), bool).at[:, 0].set(True)
        is_current = (jnp.arange(self.num_players) == state.cur_player)[:, None]
        return jnp.where(is_current, self._current_legal(state)[None], others)

    # --- game -----------------------------------------------------------------------------------------

    def score(self, state: HanabiState) -> jax.Array:
        return jnp.where(state.life_tokens > 0, jnp.sum(state.fireworks), 0).astype(jnp.int32)

    def game_over(self, state: HanabiState) -> jax.Array:
        """The original's `is_terminal`: out of lives, every firework complete, or the last round done."""
        complete = jnp.sum(state.fireworks) >= self.colors * self.ranks
        return (state.life_tokens < 1) | complete | (state.turns_to_play <= 0)

    def reset_with_deck(self, deck: jax.Array) -> tuple[jax.Array, HanabiState]:
        """(obs, state) of a game whose cards are dealt in the order of `deck` [deck_size] (cards as
        color * ranks + rank, each as often as the game has copies of it)."""
        P, H, C, R = self.num_players, self.hand_size, self.colors, self.ranks
        deck = jnp.asarray(deck, jnp.int32)
        zero = jnp.int32(0)
        state = HanabiState(
            deck=deck,
            dealt=jnp.int32(P * H),
            hands=deck[: P * H].reshape(P, H),
            color_plausible=jnp.ones((P, H, C), bool),
            rank_plausible=jnp.ones((P, H, R), bool),
            color_hint=jnp.full((P, H), -1, jnp.int32),
            rank_hint=jnp.full((P, H), -1, jnp.int32),
            fireworks=jnp.zeros((C,), jnp.int32),
            discards=jnp.zeros((C * R,), jnp.int32),
            info_tokens=jnp.int32(self.max_information_tokens),
            life_tokens=jnp.int32(self.max_life_tokens),
            cur_player=zero,
            turns_to_play=jnp.int32(P),
            last_player=jnp.int32(-1),
            last_type=zero,
            last_target=zero,
            last_value=zero,
            last_revealed=jnp.zeros((H,), bool),
            last_index=zero,
            last_card=zero,
            last_scored=jnp.asarray(False),
            last_info=jnp.asarray(False),
        )
        return self.observations(state), state

    def reset(self, key):
        return self.reset_with_deck(
            jnp.asarray(self._instance_card)[jax.random.permutation(key, self.deck_size)]
        )

    def step(self, key, state: HanabiState, actions):
        del key  # chance lives in the deck order drawn at reset
        legal = self._current_legal(state)
        chosen = jnp.asarray(actions, jnp.int32)[state.cur_player]
        ok = (chosen >= 0) & (chosen < self.num_moves) & legal[jnp.clip(chosen, 0, self.num_moves - 1)]
        move = jnp.where(ok, chosen, jnp.argmax(legal)).astype(jnp.int32)
        over = self.game_over(state)
        new_state = self._apply(state, move)
        new_state = jax.tree.map(lambda old, new: jnp.where(over, old, new), state, new_state)
        reward = (self.score(new_state) - self.score(state)).astype(jnp.float32)
        P = self.num_players
        terminated = jnp.broadcast_to(self.game_over(new_state), (P,))
        info = {"score": self.score(new_state), "move": jnp.where(over, -1, move)}
        return (
            self.observations(new_state),
            new_state,
            jnp.broadcast_to(reward, (P,)),
            terminated,
            jnp.zeros((P,), bool),
            info,
        )

    def _apply(self, s: HanabiState, move: jax.Array) -> HanabiState:
        """`HanabiState.ApplyMove` of a legal move followed by the chance deal it calls for."""
        P, H, C, R = self.num_players, self.hand_size, self.colors, self.ranks
        move_type, index, offset, value = self.decode_move(move)
        p = s.cur_player
        is_play, is_discard = move_type == PLAY, move_type == DISCARD
        leaves = is_play | is_discard
        is_hint = ~leaves
        deck_empty = s.dealt >= self.deck_size

        # Play or discard: the card leaves its slot and the newer cards shift down.
        hand = s.hands[p]
        card = hand[index]
        color, rank = card // R, card % R
        playable = is_play & (s.fireworks[color] == rank)
        fireworks = s.fireworks.at[color].add(jnp.where(playable, 1, 0))
        completed = playable & (fireworks[color] == R)
        gains_info = (is_discard | completed) & (s.info_tokens < self.max_information_tokens)
        to_discards = is_discard | (is_play & ~playable)
        discards = s.discards.at[card].add(jnp.where(leaves & to_discards, 1, 0))
        lives = s.life_tokens - jnp.where(is_play & ~playable, 1, 0)

        slot = jnp.arange(H)
        source = jnp.where(slot < index, slot, slot + 1)  # H means "past the end"

        def shifted(rows, fill):
            padded = jnp.concatenate([rows, jnp.broadcast_to(fill, (1, *rows.shape[1:]))], axis=0)
            return padded[source]

        num_cards = jnp.sum(hand >= 0)
        deals = leaves & ~deck_empty
        new_card = s.deck[jnp.minimum(s.dealt, self.deck_size - 1)]
        at_end = deals & (slot == num_cards - 1)
        own_hand = jnp.where(at_end, new_card, shifted(hand, jnp.int32(-1)))
        own_cp = jnp.where(at_end[:, None], True, shifted(s.color_plausible[p], True))
        own_rp = jnp.where(at_end[:, None], True, shifted(s.rank_plausible[p], True))
        own_ch = jnp.where(at_end, -1, shifted(s.color_hint[p], jnp.int32(-1)))
        own_rh = jnp.where(at_end, -1, shifted(s.rank_hint[p], jnp.int32(-1)))

        # Reveal: every card of the target's hand learns whether it has the color (rank).
        target = (p + offset) % P
        t_hand = s.hands[target]
        valid = t_hand >= 0
        is_color = move_type == REVEAL_COLOR
        matches = valid & jnp.where(is_color, t_hand // R == value, t_hand % R == value)
        cp, rp = s.color_plausible[target], s.rank_plausible[target]
        hinted_color = jnp.arange(C) == value
        hinted_rank = jnp.arange(R) == value
        t_cp = jnp.where(
            is_color & valid[:, None], jnp.where(matches[:, None], hinted_color, cp & ~hinted_color), cp
        )
        t_rp = jnp.where(
            ~is_color & valid[:, None], jnp.where(matches[:, None], hinted_rank, rp & ~hinted_rank), rp
        )
        t_ch = jnp.where(is_color & matches, value, s.color_hint[target])
        t_rh = jnp.where(~is_color & matches, value, s.rank_hint[target])

        def update(field, own, hinted):
            field = jnp.where(leaves, field.at[p].set(own), field)
            return jnp.where(is_hint, field.at[target].set(hinted), field)

        return HanabiState(
            deck=s.deck,
            dealt=s.dealt + jnp.where(deals, 1, 0),
            hands=update(s.hands, own_hand, t_hand),
            color_plausible=update(s.color_plausible, own_cp, t_cp),
            rank_plausible=update(s.rank_plausible, own_rp, t_rp),
            color_hint=update(s.color_hint, own_ch, t_ch),
            rank_hint=update(s.rank_hint, own_rh, t_rh),
            fireworks=jnp.where(leaves, fireworks, s.fireworks),
            discards=discards,
            info_tokens=s.info_tokens + jnp.where(leaves & gains_info, 1, 0) - jnp.where(is_hint, 1, 0),
            life_tokens=jnp.where(leaves, lives, s.life_tokens),
            cur_player=(p + 1) % P,
            turns_to_play=s.turns_to_play - jnp.where(deck_empty, 1, 0),
            last_player=p,
            last_type=move_type,
            last_target=jnp.where(is_hint, target, 0),
            last_value=jnp.where(is_hint, value, 0),
            last_revealed=is_hint & matches,
            last_index=jnp.where(leaves, index, 0),
            last_card=jnp.where(leaves, card, 0),
            last_scored=playable,
            last_info=is_play & gains_info,
        )

    # --- the canonical observation encoding --------------------------------------------------------------

    def observations(self, state: HanabiState) -> jax.Array:
        """[p, obs_dim] float32: `ObservationEncoder` (canonical) of each player's observation."""
        return jax.vmap(self._encode, in_axes=(None, 0))(state, jnp.arange(self.num_players)).astype(
            jnp.float32
        )

    def _encode(self, s: HanabiState, observer: jax.Array) -> jax.Array:
        P, H, C, R = self.num_players, self.hand_size, self.colors, self.ranks
        seats = (observer + jnp.arange(P)) % P  # players in the observer's order: self first
        hands = s.hands[seats]  # [p, h]
        valid = hands >= 0
        cards = jax.nn.one_hot(hands, C * R, dtype=jnp.int32)  # -1 (absent) encodes as all zeros

        def thermometer(count, size):
            return (jnp.arange(size) < count).astype(jnp.int32)

        last = s.last_player >= 0
        t = s.last_type
        hint = last & ((t == REVEAL_COLOR) | (t == REVEAL_RANK))
        leaves = last & ((t == PLAY) | (t == DISCARD))

        def one_hot(x, n, on):
            return jax.nn.one_hot(jnp.where(on, x, -1), n, dtype=jnp.int32)

        plausible = s.color_plausible[seats][..., :, None] & s.rank_plausible[seats][..., None, :]
        knowledge = (
            jnp.concatenate(
                [
                    plausible.reshape(P, H, C * R).astype(jnp.int32),
                    jax.nn.one_hot(s.color_hint[seats], C, dtype=jnp.int32),
                    jax.nn.one_hot(s.rank_hint[seats], R, dtype=jnp.int32),
                ],
                axis=-1,
            )
            * valid[..., None]
        )
        sections = [
            # hands: the others' cards, then which hands (own included) are short of a card
            cards[1:].reshape(-1),
            (jnp.sum(valid, axis=1) < H).astype(jnp.int32),
            # board: deck left, fireworks (one-hot of the top card), info and life tokens
            thermometer(self.deck_size - s.dealt, self.deck_size - P * H),
            jax.nn.one_hot(s.fireworks - 1, R, dtype=jnp.int32).reshape(-1),
            thermometer(s.info_tokens, self.max_information_tokens),
            thermometer(s.life_tokens, self.max_life_tokens),
            # discards: a thermometer per card over its copies
            (s.discards[self._instance_card] > self._instance_copy).astype(jnp.int32),
            # last action
            one_hot((s.last_player - observer) % P, P, last),
            one_hot(t, 4, last),
            one_hot((s.last_target - observer) % P, P, hint),
            one_hot(s.last_value, C, last & (t == REVEAL_COLOR)),
            one_hot(s.last_value, R, last & (t == REVEAL_RANK)),
            (s.last_revealed & hint).astype(jnp.int32),
            one_hot(s.last_index, H, leaves),
            one_hot(s.last_card, C * R, leaves),
            jnp.stack([last & (t == PLAY) & s.last_scored, last & (t == PLAY) & s.last_info]).astype(
                jnp.int32
            ),
            # card knowledge of every hand, own first
            knowledge.reshape(-1),
        ]
        return jnp.concatenate(sections)
