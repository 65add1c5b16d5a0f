"""Speculative sampling with a draft model (Leviathan et al. 2023; Chen et al. 2023), batched over slots.

One round, for every slot at once: the draft proposes k tokens one at a time, sampling from its own
distribution q (the request's temperature / top-k / top-p / min-p applied to the draft's logits); the
target scores the slot's next token and the k proposals in ONE forward, giving its distributions p at the
k + 1 positions; proposal i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), in order, until the
first rejection; there a token is drawn from the residual max(0, p_i - q_i) (normalised), or, when all k
were accepted, a bonus token from p_{k+1}. Every emitted token then follows the target's distribution
exactly (the rejection rule's theorem), whatever the draft. Greedy (temperature 0) is the same rule with
one-hot distributions: proposals are accepted while they equal the target's argmax, so the output equals
plain greedy decoding token for token.

Slots accept different numbers of tokens (1 to k + 1 per round); each slot's caches stay valid up to its
accepted prefix: entries written for rejected proposals sit past the slot's length and are never seen (a
query attends only to entries at or before its position) and are overwritten later. That is why the
models must be softmax-attention only: a linear-attention state cannot take rejected tokens back out.
The draft runs k + 1 steps (the last feeds the k-th proposal) so its cache covers the same positions as
the target's.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxpar.infer import sampling
from jaxpar.infer.decoder import Decoder
from jaxpar.infer.model import LoadedModel


def accept(drafts_BK, q_BKV, p_BTV, keys_B):
    """The rejection rule. drafts_BK: the proposals; q_BKV: the draft's distributions they were drawn
    from; p_BTV: the target's distributions at the K + 1 positions (T = K + 1). Returns (accepted
    proposals per row m_B in 0..K, tokens_BT: the m accepted proposals, then the residual or bonus token
    at index m; entries after m are meaningless)."""
    B, K = drafts_BK.shape
    p_at_BK = jnp.take_along_axis(p_BTV[:, :K], drafts_BK[..., None], axis=-1)[..., 0]
    q_at_BK = jnp.take_along_axis(q_BKV, drafts_BK[..., None], axis=-1)[..., 0]
    u_BK = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1), (K,)))(keys_B)
    ok_BK = u_BK * q_at_BK < p_at_BK  # u < p / q, without dividing
    m_B = jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=1), axis=1)
    q_BTV = jnp.concatenate([q_BKV, jnp.zeros_like(q_BKV[:, :1])], axis=1)  # no draft past K: bonus = p
    p_m_BV = jnp.take_along_axis(p_BTV, m_B[:, None, None], axis=1)[:, 0]
    q_m_BV = jnp.take_along_axis(q_BTV, m_B[:, None, None], axis=1)[:, 0]
    residual_BV = jnp.maximum(p_m_BV - q_m_BV, 0.0)
    total_B = jnp.sum(residual_BV, axis=-1, keepdims=True)
    residual_BV = jnp.where(total_B > 0, residual_BV / jnp.where(total_B > 0, total_B, 1.0), p_m_BV)
    c_B = jax.vmap(lambda key, r: jax.random.categorical(jax.random.fold_in(key, 2), jnp.log(r)))(
        keys_B, residual_BV
    )
    tokens_BT = jnp.concatenate([drafts_BK, jnp.zeros_like(drafts_BK[:, :1])], axis=1)
    tokens_BT = jnp.where(jnp.arange(K + 1)[None] == m_B[:, None], c_B[:, None], tokens_BT)
    return m_B, tokens_BT.astype(jnp.int32)


def _speculate(graphdefs, k, params, caches, next_B, length_B, sampler_args):
    """One round for every slot; returns (tokens [B, k+1], log-probabilities under the target [B, k+1],
    (target cache, draft cache)), the accepted count folded into the tokens' validity (see `accept`)."""
    target = nnx.merge(graphdefs[0], params[0])
    draft = nnx.merge(graphdefs[1], params[1])
    seeds_B, counts_B, *filters = sampler_args
    keys_B = sampling.token_keys(seeds_B, counts_B)
    ones_B1 = jnp.ones_like(next_B)[:, None]

    def draft_step(carry, i):
        cache, token_B = carry
        logits_B1V, cache = draft.forward_cached(token_B[:, None], (length_B + i)[:, None], ones_B1, cache)
        q_BV = sampling.distribution(logits_B1V[:, 0], *filters)
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, 3 + i)
        proposal_B = jax.vmap(jax.random.categorical)(keys, jnp.log(q_BV)).astype(jnp.int32)
        return (cache, proposal_B), (proposal_B, q_BV)

    (draft_cache, _), (proposals_TB, q_TBV) = lax.scan(draft_step, (caches[1], next_B), jnp.arange(k + 1))
    drafts_BK = proposals_TB[:k].T
    q_BKV = jnp.moveaxis(q_TBV[:k], 0, 1)
    fed_BT = jnp.concatenate([next_B[:, None], drafts_BK], axis=1)
    positions_BT = length_B[:, None] + jnp.arange(k + 1, dtype=length_B.dtype)[None]
    logits_BTV, target_cache = target.forward_cached(fed_BT, positions_BT, jnp.ones_like(fed_BT), caches[0])
    p_BTV = jax.vmap(lambda logits: sampling.distribution(logits, *filters), in_axes=1, out_axes=1)(
        logits_BTV
    )
    m_B, tokens_BT = accept(drafts_BK, q_BKV, p_BTV, keys_B)
    logprobs_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV, axis=-1), tokens_BT[..., None], axis=-1)
    return tokens_BT, logprobs_BT[..., 0], m_B + 1, (target_cache, draft_cache)


def check_pair(target: LoadedModel, draft: LoadedModel) -> None:
    """ValueError unless `draft` can draft for `target`: the same vocabulary, softmax attention only (a
    linear-attention state cannot drop rejected tokens), the same mesh."""
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({draft.cfg.vocab_size}) differs from the target's "
            f"({target.cfg.vocab_size})"
        )
    for role, model in (("target", target), ("draft", draft)):
        if model.cfg.mixer != "softmax":
            raise ValueError(
                f"speculative decoding needs softmax-attention models; the {role} has "
                f"mixer={model.cfg.mixer!r} (a recurrent state cannot take rejected tokens back)"
            )
    if draft.mesh != target.mesh:
        raise ValueError("the draft and the target must be placed on the same mesh")


class DraftLength:
    """Adaptive draft length: the k expected to give the most tokens per second next round, among the
    powers of two up to k_max and k_max itself (`choices`: one compiled round program each).

    Expected tokens per round of a slot with per-proposal acceptance rate a: (1 - a^(k+1)) / (1 - a)
    (accepted prefix + the corrected or bonus token). a is estimated from every live slot's rounds so far
    (accepted proposals over proposals tried up to and including the first rejection; a Beta(1, 1) prior).
    A round's time at k is measured (the first round at a k compiles its program and is not counted) and
    fitted by a line in k over the k tried: k = 1 and k = k_max first (EXPLORE timed rounds each), then
    whatever the choice picks."""

    EXPLORE = 3  # timed rounds at k = 1 and at k = k_max before choosing (one round's time is noisy)

    def __init__(self, k_max: int):
        self.k_max = k_max
        self.choices = tuple(sorted({*(2**i for i in range(k_max.bit_length()) if 2**i <= k_max), k_max}))
        self.accepted = self.tried = 0
        self.seconds: dict[int, list[float]] = {}

    def acceptance(self) -> float:
        return (self.accepted + 1) / (self.tried + 2)

    def choose(self) -> int:
        for k in (1, self.k_max):
            if len(self.seconds.get(k, ())) < self.EXPLORE:
                return k
        ks = sorted(self.seconds)
        times = [float(np.median(self.seconds[k][-8:])) for k in ks]
        slope, intercept = np.polyfit(ks, times, 1)
        a = min(self.acceptance(), 0.999)

        def tokens_per_second(k):
            return (1 - a ** (k + 1)) / (1 - a) / max(intercept + slope * k, 1e-9)

        return max(self.choices, key=tokens_per_second)

    def record(self, k: int, accepted_per_slot, seconds: float | None) -> None:
        """One round at k: the live slots' accepted counts, and its time (None: it compiled)."""
        for m in accepted_per_slot:
            self.accepted += int(m)
            self.tried += int(m) + (int(m) < k)
        if seconds is not None:
            self.seconds.setdefault(k, []).append(seconds)


class SpeculativeDecoder:
    """Decoder interface (see jaxpar.infer.decoder) for a target model with a draft proposing k tokens
    per round (adaptive: a k chosen each round by `DraftLength`; its round programs compile up front)."""

    def __init__(
        self,
        target: LoadedModel,
        draft: LoadedModel,
        k: int,
        slots,
        capacity,
        prefill_chunk,
        cache_dtype,
        attention,
        adaptive: bool = False,
    ):
        check_pair(target, draft)
        if k < 1:
            raise ValueError(f"num_draft={k} must be >= 1")
        self.model, self.k = target, k
        self.draft_length = DraftLength(k) if adaptive else None
        self.chosen: list[int] = []  # k of every round
        self.target = Decoder(target, slots, capacity, prefill_chunk, cache_dtype, attention)
        self.draft = Decoder(draft, slots, capacity, prefill_chunk, cache_dtype, attention)
        self.cache_bytes = self.target.cache_bytes + self.draft.cache_bytes
        self._programs: dict[int, object] = {}  # k -> the jitted round
        self.rounds = 0  # target forwards for decoding (prefill excluded)
        if self.draft_length is not None:  # compile every choice now, not while serving
            with jax.set_mesh(target.mesh):
                for choice in self.draft_length.choices:
                    self._warm(choice, slots)

    def reset(self) -> None:
        self.target.reset()
        self.draft.reset()

    def _program(self, k: int):
        if k not in self._programs:
            replicated = jax.sharding.NamedSharding(self.model.mesh, jax.sharding.PartitionSpec())
            graphdefs = (self.target.model.graphdef, self.draft.model.graphdef)
            self._programs[k] = jax.jit(
                lambda *args: _speculate(graphdefs, k, *args),
                donate_argnums=(1,),
                out_shardings=(
                    replicated,
                    replicated,
                    replicated,
                    (self.target.cache_shardings, self.draft.cache_shardings),
                ),
            )
        return self._programs[k]

    def _warm(self, k: int, slots: int) -> None:
        """Runs the round program of k once on empty slots (it writes stale entries only)."""
        zeros = np.zeros(slots, np.int32)
        sampler = (
            zeros.astype(np.uint32),
            zeros,
            zeros.astype(np.float32),
            zeros,
            np.ones(slots, np.float32),
            zeros.astype(np.float32),
        )
        params = (self.target.model.params, self.draft.model.params)
        *_, caches = self._program(k)(params, (self.target.cache, self.draft.cache), zeros, zeros, sampler)
        self.target.cache, self.draft.cache = caches

    def compiled_programs(self) -> int:
        rounds = sum(p._cache_size() for p in self._programs.values())
        return self.target._prefill._cache_size() + self.draft._prefill._cache_size() + rounds

    def prefill(self, slot: int, ids: np.ndarray, sampler_row) -> tuple[int, float]:
        self.draft.prefill(slot, ids, sampler_row)
        return self.target.prefill(slot, ids, sampler_row)

    def round(self, next_B, length_B, sampler_args, live=None):
        k = self.draft_length.choose() if self.draft_length else self.k
        program = self._program(k)
        compiles = program._cache_size() == 0
        params = (self.target.model.params, self.draft.model.params)
        start = time.perf_counter()
        with jax.set_mesh(self.model.mesh):
            tokens, logprobs, made, caches = program(
                params, (self.target.cache, self.draft.cache), next_B, length_B, sampler_args
            )
            tokens, logprobs, made = np.asarray(tokens), np.asarray(logprobs), np.asarray(made)
        self.target.cache, self.draft.cache = caches
        if self.draft_length is not None:
            accepted = made[live] - 1 if live is not None else made - 1
            self.draft_length.record(k, accepted, None if compiles else time.perf_counter() - start)
        self.rounds += 1
        self.chosen.append(k)
        return tokens, logprobs, made
