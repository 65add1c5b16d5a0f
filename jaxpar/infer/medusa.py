"""Medusa decoding (Cai et al. 2024): the model's own Medusa heads propose a tree of candidates, the
model verifies the whole tree in ONE forward with a tree attention mask, and the longest acceptable path
plus one corrected (or bonus) token is emitted. Batched over slots, one compiled round for all.

The tree is static (`Tree`): node 0 is the root, the token fed this round (at position `length`); a node
at depth d (1..K) holds a choice of head d, read from the hidden state of the position before the root,
so it proposes the token at position length + d. Every node has up to `width` children (choices 0..width-1
of the next head), breadth first, capped at `candidates` nodes besides the root.

Filling the tree, per slot:
  greedy (temperature 0)  the node of choice r holds head d's r-th most likely token; the target's argmax
      at a node is accepted when it is among the node's children; the output equals plain greedy
      decoding token for token (the target's argmax is all that is ever emitted).
  sampling  every node holds its own independent draw from q_d, head d's distribution under the
      request's temperature / top-k / top-p / min-p (siblings are i.i.d. draws). Verification walks down
      from the root with the multi-draft rejection rule of SpecInfer (Miao et al. 2024, "multi-step
      speculative sampling"): at a node with target distribution p, its children x_1, x_2, ... are tried in
      turn, x_i accepted with probability min(1, p(x_i) / q_d(x_i)); after a rejection p becomes the
      normalised residual max(0, p - q_d); the first accepted child becomes the node, and when none is
      accepted (or the node is a leaf) the emitted token is drawn from the current p. Each step is a
      standard speculative-sampling step from p against q_d with a fresh independent draft, so every
      emitted token follows the target's distribution exactly. (Medusa's "typical acceptance" is not
      exact and is not offered.)

The tree's keys and values are written at consecutive scratch entries length .. length + T - 1 (siblings
share a position), with RoPE at their real positions (length + depth); after acceptance the accepted
path's entries are moved to entries length + 1 .. length + m (`compact`), which is where their positions
say they belong, so the cache then holds exactly the accepted tokens. The cache is allocated T entries
beyond the engine's capacity for that scratch space.

The hidden state at the last accepted node is carried to the next round (per slot, [slots, D]): the
heads read it to propose the next tree.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpar.infer import sampling
from jaxpar.infer.cache import KVCache, cache_shardings, init_cache
from jaxpar.infer.decoder import (
    MIN_BUCKET,
    _put_row,
    _take_row,
    next_power_of_two,
    prefill_buckets,
    prefill_in_chunks,
    sample_with,
)
from jaxpar.infer.model import LoadedModel
from jaxpar.models.medusa import head_logits

# fold_in salts of a round's random draws (per slot key = the request's key of its next token).
NODE_SALT, UNIFORM_SALT, BONUS_SALT = 1000, 2000, 3000


@dataclasses.dataclass(frozen=True)
class Tree:
    """A static candidate tree in breadth-first order (parents before children); node 0 is the root."""

    parent: tuple[int, ...]  # parent[0] = -1
    depth: tuple[int, ...]  # the root 0; a node at depth d holds a choice of head d
    rank: tuple[int, ...]  # which choice of its head (greedy: the rank-th most likely token)
    width: int

    @property
    def size(self) -> int:
        return len(self.parent)

    @property
    def heads(self) -> int:
        return max(self.depth)

    def children(self) -> np.ndarray:
        """[nodes, width] int32: each node's children in trial order, -1 where it has fewer."""
        out = np.full((self.size, self.width), -1, np.int32)
        for node in range(1, self.size):
            out[self.parent[node], self.rank[node]] = node
        return out

    def ancestor_mask(self) -> np.ndarray:
        """[nodes, nodes] bool: mask[i, j] when j is i or one of its ancestors (what i may attend to)."""
        mask = np.eye(self.size, dtype=bool)
        for node in range(1, self.size):
            mask[node] |= mask[self.parent[node]]
        return mask


def make_tree(heads: int, width: int, candidates: int) -> Tree:
    """Up to `candidates` nodes besides the root: every node's `width` top choices of the next head,
    breadth first, down to depth `heads`."""
    if heads < 1 or width < 1 or candidates < 1:
        raise ValueError(
            f"a Medusa tree needs heads >= 1 (model.medusa_heads={heads}), width >= 1 (got {width}) and "
            f"candidates >= 1 (got {candidates})"
        )
    parent, depth, rank = [-1], [0], [0]
    level = [0]
    for d in range(1, heads + 1):
        next_level = []
        for node in level:
            for r in range(width):
                if len(parent) > candidates:
                    break
                parent.append(node)
                depth.append(d)
                rank.append(r)
                next_level.append(len(parent) - 1)
        level = next_level
    return Tree(tuple(parent), tuple(depth), tuple(rank), width)


def propose(tree: Tree, head_logits_KBV, keys_B, filters):
    """(candidate tokens [B, nodes] (node 0 left 0: the caller puts the root there), the heads'
    distributions q [B, K, V]). Greedy rows: the rank-th most likely token of the node's head; sampling
    rows: an independent draw from q per node."""
    K, B, V = head_logits_KBV.shape
    q_KBV = jax.vmap(lambda logits: sampling.distribution(logits, *filters))(head_logits_KBV)
    top_KBW = lax.top_k(head_logits_KBV, min(tree.width, V))[1]
    depth = np.asarray(tree.depth)
    head_N = np.maximum(depth - 1, 0)
    ranked_BN = top_KBW[head_N, :, np.minimum(np.asarray(tree.rank), V - 1)].T
    node_keys_BN = jax.vmap(
        lambda key: jax.vmap(lambda n: jax.random.fold_in(key, NODE_SALT + n))(jnp.arange(tree.size))
    )(keys_B)
    log_q_BNV = jnp.log(jnp.moveaxis(q_KBV, 0, 1)[:, head_N])
    drawn_BN = jax.vmap(jax.vmap(jax.random.categorical))(node_keys_BN, log_q_BNV)
    greedy_B1 = (filters[0] <= 0)[:, None]
    tokens_BN = jnp.where(greedy_B1, ranked_BN, drawn_BN)
    return jnp.where(depth[None] > 0, tokens_BN, 0).astype(jnp.int32), jnp.moveaxis(q_KBV, 0, 1)


def accept_tree(tree: Tree, tokens_BN, q_BKV, p_BNV, keys_B):
    """The multi-draft rejection walk (module docstring). tokens_BN: the candidates; q_BKV: the head
    distributions they were drawn from; p_BNV: the target's distribution at every node. Returns
    (accepted depth m_B in 0..K, accepted nodes path_BK (entries past m meaningless), the emitted tokens
    [B, K + 1]: m accepted candidates then the corrected or bonus token at index m, the last accepted
    node last_B (0: the root))."""
    B, N = tokens_BN.shape
    K = tree.heads
    children_NW = jnp.asarray(tree.children())
    rows = jnp.arange(B)
    u_BN = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, UNIFORM_SALT), (N,)))(keys_B)
    node_B = jnp.zeros(B, jnp.int32)
    p_BV = p_BNV[:, 0]
    walking_B = jnp.ones(B, bool)
    m_B = jnp.zeros(B, jnp.int32)
    path_BK = jnp.zeros((B, K), jnp.int32)
    for d in range(1, K + 1):
        q_BV = q_BKV[:, d - 1]
        found_B = jnp.zeros(B, bool)
        chosen_B = node_B
        for w in range(tree.width):
            child_B = children_NW[node_B, w]
            trying_B = walking_B & ~found_B & (child_B >= 0)
            safe_B = jnp.maximum(child_B, 0)
            x_B = tokens_BN[rows, safe_B]
            ok_B = u_BN[rows, safe_B] * q_BV[rows, x_B] < p_BV[rows, x_B]  # u < p / q, without dividing
            take_B = trying_B & ok_B
            chosen_B = jnp.where(take_B, safe_B, chosen_B)
            found_B = found_B | take_B
            residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
            total_B1 = jnp.sum(residual_BV, axis=-1, keepdims=True)
            residual_BV = jnp.where(total_B1 > 0, residual_BV / jnp.where(total_B1 > 0, total_B1, 1.0), p_BV)
            p_BV = jnp.where((trying_B & ~ok_B)[:, None], residual_BV, p_BV)
        walking_B = walking_B & found_B
        node_B = chosen_B
        path_BK = path_BK.at[:, d - 1].set(node_B)
        m_B = m_B + walking_B
        p_BV = jnp.where(found_B[:, None], p_BNV[rows, node_B], p_BV)
    bonus_B = jax.vmap(
        lambda key, p: jax.random.categorical(jax.random.fold_in(key, BONUS_SALT), jnp.log(p))
    )(keys_B, p_BV)
    emitted_BT = jnp.concatenate([tokens_BN[rows[:, None], path_BK], jnp.zeros((B, 1), jnp.int32)], axis=1)
    emitted_BT = jnp.where(jnp.arange(K + 1)[None] == m_B[:, None], bonus_B[:, None], emitted_BT)
    return m_B, path_BK, emitted_BT.astype(jnp.int32), node_B


def compact(cache: KVCache, length_B, path_BK, m_B) -> KVCache:
    """Moves the accepted path's keys and values from their scratch entries (length + node) to
    length + 1 .. length + m; the rest of the scratch space is left stale (past the row's length)."""
    B, K = path_BK.shape
    S = cache.k_BSKH.shape[-3]
    rows_B1 = jnp.arange(B)[:, None]
    depth_K = jnp.arange(1, K + 1)
    src_BK = length_B[:, None] + path_BK
    dst_BK = jnp.where(depth_K[None] <= m_B[:, None], length_B[:, None] + depth_K[None], S)  # S: dropped

    def move(x_LBSKH):
        moved_LBKKH = x_LBSKH[:, rows_B1, jnp.minimum(src_BK, S - 1)]
        return x_LBSKH.at[:, rows_B1, dst_BK].set(moved_LBKKH, mode="drop")

    return cache.replace(k_BSKH=move(cache.k_BSKH), v_BSKH=move(cache.v_BSKH))


def _round(graphdef, tree: Tree, params, state, next_B, length_B, sampler_args):
    """One Medusa round for every slot: (tokens [B, K + 1], their log-probabilities under the target,
    tokens made per slot [B], (cache, hidden [B, D]))."""
    cache, hidden_BD = state
    model = nnx.merge(graphdef, params)
    seeds_B, counts_B, *filters = sampler_args
    keys_B = sampling.token_keys(seeds_B, counts_B)
    tokens_BN, q_BKV = propose(tree, head_logits(model, hidden_BD[:, None])[:, :, 0], keys_B, filters)
    tokens_BN = tokens_BN.at[:, 0].set(next_B)
    B, N = tokens_BN.shape
    positions_BN = length_B[:, None] + jnp.asarray(tree.depth, length_B.dtype)[None]
    L = cache.k_BSKH.shape[0]
    mask_LBNN = jnp.broadcast_to(jnp.asarray(tree.ancestor_mask()), (L, B, N, N))
    h_BND, _, cache = model.hidden_states(
        tokens_BN, positions_BN, jnp.ones_like(tokens_BN), cache.replace(new_mask_BTT=mask_LBNN)
    )
    cache = cache.replace(new_mask_BTT=None)
    logits_BNV = model.logits(h_BND)
    p_BNV = jax.vmap(lambda logits: sampling.distribution(logits, *filters), in_axes=1, out_axes=1)(
        logits_BNV
    )
    m_B, path_BK, tokens_BT, last_B = accept_tree(tree, tokens_BN, q_BKV, p_BNV, keys_B)
    rows = jnp.arange(B)
    # The emitted token at depth j was predicted at node j - 1 of the path (the root for j = 0).
    from_BT = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), path_BK], axis=1)
    from_BT = jnp.where(jnp.arange(tree.heads + 1)[None] <= m_B[:, None], from_BT, last_B[:, None])
    log_probs_BTV = jax.nn.log_softmax(logits_BNV[rows[:, None], from_BT], axis=-1)
    logprobs_BT = jnp.take_along_axis(log_probs_BTV, tokens_BT[..., None], axis=-1)[..., 0]
    cache = compact(cache, length_B, path_BK, m_B)
    return tokens_BT, logprobs_BT, m_B + 1, (cache, h_BND[rows, last_B])


def _prefill(graphdef, params, state, slot, tokens_1T, start, valid, sampler_args):
    """jaxpar.infer.decoder's prefill, also keeping the last real token's hidden state for the heads."""
    cache, hidden_BD = state
    T = tokens_1T.shape[1]
    model = nnx.merge(graphdef, params)
    positions_1T = start + jnp.arange(T, dtype=jnp.int32)[None]
    segments_1T = (jnp.arange(T) < valid).astype(jnp.int32)[None]
    h_1TD, _, row = model.hidden_states(tokens_1T, positions_1T, segments_1T, _take_row(cache, slot))
    h_1D = lax.dynamic_index_in_dim(h_1TD[0], valid - 1, 0, keepdims=True)
    tokens, logprobs = sample_with(model.logits(h_1D[:, None])[:, 0], sampler_args)
    hidden_BD = lax.dynamic_update_index_in_dim(hidden_BD, h_1D.astype(hidden_BD.dtype), slot, 0)
    return tokens[0], logprobs[0], (_put_row(cache, row, slot), hidden_BD)


def check_model(model: LoadedModel) -> None:
    """ValueError unless `model` can decode with Medusa: it has heads, and softmax attention only."""
    if not model.cfg.medusa_heads:
        raise ValueError(
            f"{model.name} has no Medusa heads (model.medusa_heads=0): train them with "
            "experiments/train_lm.py --config.model.medusa_heads=K --config.train.init_from=BASE_WORKDIR"
        )
    if model.cfg.moe.experts and model.cfg.moe.mixed:
        raise ValueError(
            "Medusa decoding needs one stack of identical layers; this model mixes dense and MoE layers "
            f"(model.moe.first_dense={model.cfg.moe.first_dense}, model.moe.every={model.cfg.moe.every})."
        )
    if model.cfg.mixer != "softmax":
        raise ValueError(
            f"Medusa decoding needs a softmax-attention model; this one has mixer={model.cfg.mixer!r} "
            "(a recurrent state cannot take rejected candidates back)"
        )


class MedusaDecoder:
    """Decoder interface (jaxpar.infer.decoder) over a model with Medusa heads: up to K + 1 tokens per
    slot per round, one target forward each."""

    def __init__(
        self,
        model: LoadedModel,
        slots: int,
        capacity: int,
        prefill_chunk: int,
        cache_dtype,
        attention,
        width: int = 2,
        candidates: int = 16,
    ):
        check_model(model)
        self.model = model
        self.tree = make_tree(model.cfg.medusa_heads, width, candidates)
        self.buckets = prefill_buckets(min(prefill_chunk, max(MIN_BUCKET, next_power_of_two(capacity))))
        # Scratch room for the tree past the last position the engine uses.
        make_cache = functools.partial(
            init_cache, model.cfg, slots, capacity + self.tree.size, cache_dtype, attention
        )
        mesh = model.mesh
        replicated = NamedSharding(mesh, P())
        with jax.set_mesh(mesh):
            kv_shardings = cache_shardings(mesh, jax.eval_shape(make_cache))
            self.state_shardings = (kv_shardings, replicated)
            hidden = jax.ShapeDtypeStruct((slots, model.cfg.d_model), jnp.dtype(model.cfg.dtype))
            self._new_state = jax.jit(
                lambda: (make_cache(), jnp.zeros(hidden.shape, hidden.dtype)),
                out_shardings=self.state_shardings,
            )
        self.reset()
        self.cache_bytes = sum(x.nbytes for x in jax.tree.leaves(self.state[0]))
        out = (replicated, replicated, self.state_shardings)
        self._prefill = jax.jit(
            functools.partial(_prefill, model.graphdef), donate_argnums=(1,), out_shardings=out
        )
        self._round = jax.jit(
            functools.partial(_round, model.graphdef, self.tree),
            donate_argnums=(1,),
            out_shardings=(replicated, *out),
        )
        self.rounds = 0  # target forwards for decoding (prefill excluded)
        self.accepted = 0  # candidates accepted, summed over live slots and rounds
        self.slot_rounds = 0

    def reset(self) -> None:
        with jax.set_mesh(self.model.mesh):
            self.state = self._new_state()

    def compiled_programs(self) -> int:
        return self._prefill._cache_size() + self._round._cache_size()

    def prefill(self, slot: int, ids: np.ndarray, sampler_row) -> tuple[int, float]:
        token, logprob, self.state = prefill_in_chunks(
            self._prefill, self.model, self.state, slot, ids, self.buckets, sampler_row
        )
        return token, logprob

    def round(self, next_B, length_B, sampler_args, live=None):
        with jax.set_mesh(self.model.mesh):
            tokens, logprobs, made, self.state = self._round(
                self.model.params, self.state, next_B, length_B, sampler_args
            )
            tokens, logprobs, made = np.asarray(tokens), np.asarray(logprobs), np.asarray(made)
        self.rounds += 1
        live = range(len(made)) if live is None else live
        self.accepted += int(sum(made[s] - 1 for s in live))
        self.slot_rounds += len(live)
        return tokens, logprobs, made

    def tokens_per_forward(self) -> float:
        """Mean tokens a live slot got per target forward (accepted candidates + 1)."""
        return 1.0 + self.accepted / max(self.slot_rounds, 1)
