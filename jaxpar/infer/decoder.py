"""A model's compiled inference programs over a slot cache: prefill one slot, and a decode round for all.

`Decoder` is plain decoding (one token per slot per round); jaxpar.infer.speculative.SpeculativeDecoder
has the same interface and returns up to k + 1 tokens per slot per round. The engine (jaxpar.infer.engine)
keeps the requests and the per-slot host state and never looks inside.

Programs: one decode round for all slots, one prefill per prompt bucket (powers of two from MIN_BUCKET up
to the prefill chunk). The cache is donated and comes back exactly as it went in (placement spelled the
same), so a program is never compiled twice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpar.infer import sampling
from jaxpar.infer.cache import cache_shardings, init_cache, logical_names, restart
from jaxpar.infer.model import LoadedModel

MIN_BUCKET = 16


def prefill_buckets(prefill_chunk: int) -> tuple[int, ...]:
    """Padded lengths of prefill chunks: powers of two from MIN_BUCKET up to prefill_chunk (included)."""
    buckets, b = [], MIN_BUCKET
    while b < prefill_chunk:
        buckets.append(b)
        b *= 2
    return (*buckets, prefill_chunk)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _batch_axis(path) -> int:
    return logical_names(path).index("batch")


def _take_row(cache, slot):
    return jax.tree.map_with_path(
        lambda path, x: lax.dynamic_index_in_dim(x, slot, _batch_axis(path), keepdims=True), cache
    )


def _put_row(cache, row, slot):
    return jax.tree.map_with_path(
        lambda path, x, r: lax.dynamic_update_index_in_dim(x, r, slot, _batch_axis(path)), cache, row
    )


def sample_with(logits_BV, sampler_args, salt: int = 0):
    """Tokens and log-probabilities for per-row sampler arrays (seeds, counts, temperature, top_k, top_p,
    min_p); `salt` separates independent draws made at the same count."""
    seeds_B, counts_B, *params = sampler_args
    keys_B = sampling.token_keys(seeds_B, counts_B)
    if salt:
        keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, salt)
    return sampling.sample(logits_BV, keys_B, *params)


def _prefill(graphdef, params, cache, slot, tokens_1T, start, valid, sampler_args):
    """Writes one chunk of a prompt into `slot`'s cache rows from position `start` (`valid` real tokens,
    then padding) and samples a token from the last real one's logits (used after the last chunk)."""
    T = tokens_1T.shape[1]
    model = nnx.merge(graphdef, params)
    positions_1T = start + jnp.arange(T, dtype=jnp.int32)[None]
    segments_1T = (jnp.arange(T) < valid).astype(jnp.int32)[None]
    row = restart(_take_row(cache, slot), start == 0)  # a linear state left by the slot's last request
    logits_1TV, row = model.forward_cached(tokens_1T, positions_1T, segments_1T, row)
    logits_1V = lax.dynamic_index_in_dim(logits_1TV[0], valid - 1, 0, keepdims=True)
    tokens, logprobs = sample_with(logits_1V, sampler_args)
    return tokens[0], logprobs[0], _put_row(cache, row, slot)


def _decode(graphdef, params, cache, tokens_B, positions_B, sampler_args):
    """One token for every slot: feeds tokens_B at positions_B, samples the next ([B, 1] each)."""
    model = nnx.merge(graphdef, params)
    ones_B1 = jnp.ones_like(tokens_B)[:, None]
    logits_B1V, cache = model.forward_cached(tokens_B[:, None], positions_B[:, None], ones_B1, cache)
    tokens_B, logprobs_B = sample_with(logits_B1V[:, 0], sampler_args)
    return tokens_B[:, None], logprobs_B[:, None], cache


def prefill_in_chunks(prefill, model, state, slot: int, ids: np.ndarray, buckets, sampler_row):
    """Runs a jitted `prefill(params, state, slot, padded_1T, start, valid, sampler_row)` over a prompt in
    chunks of at most buckets[-1] tokens, each padded to the smallest bucket that holds it; (the first
    generated token, its log-probability, the new state)."""
    start = 0
    with jax.set_mesh(model.mesh):
        while start < len(ids):
            chunk = ids[start : start + buckets[-1]]
            bucket = next(b for b in buckets if b >= len(chunk))
            padded = np.zeros((1, bucket), np.int32)
            padded[0, : len(chunk)] = chunk
            token, logprob, state = prefill(
                model.params,
                state,
                np.int32(slot),
                padded,
                np.int32(start),
                np.int32(len(chunk)),
                sampler_row,
            )
            start += len(chunk)
    return int(token), float(logprob), state


class Decoder:
    """Plain decoding of one model over `slots` cache rows of `capacity` tokens."""

    def __init__(
        self, model: LoadedModel, slots: int, capacity: int, prefill_chunk: int, cache_dtype, attention
    ):
        self.model = model
        self.buckets = prefill_buckets(min(prefill_chunk, max(MIN_BUCKET, next_power_of_two(capacity))))
        make_cache = functools.partial(init_cache, model.cfg, slots, capacity, cache_dtype, attention)
        with jax.set_mesh(model.mesh):
            self.cache_shardings = cache_shardings(model.mesh, jax.eval_shape(make_cache))
            self._new_cache = jax.jit(make_cache, out_shardings=self.cache_shardings)
        self.reset()
        self.cache_bytes = sum(x.nbytes for x in jax.tree.leaves(self.cache))
        self._prefill = self.jit(_prefill)
        self._decode = self.jit(_decode)
        self.rounds = 0  # decode forwards (prefill excluded)

    def jit(self, fn):
        """fn(graphdef, params, cache, ...) -> (tokens, logprobs, cache), jitted with the cache donated and
        pinned to its placement, the tokens replicated."""
        replicated = NamedSharding(self.model.mesh, P())
        return jax.jit(
            functools.partial(fn, self.model.graphdef),
            donate_argnums=(1,),
            out_shardings=(replicated, replicated, self.cache_shardings),
        )

    def reset(self) -> None:
        with jax.set_mesh(self.model.mesh):
            self.cache = self._new_cache()

    def compiled_programs(self) -> int:
        return self._prefill._cache_size() + self._decode._cache_size()

    def prefill(self, slot: int, ids: np.ndarray, sampler_row) -> tuple[int, float]:
        """Writes a prompt into `slot` chunk by chunk; the first generated token and its log-probability."""
        token, logprob, self.cache = prefill_in_chunks(
            self._prefill, self.model, self.cache, slot, ids, self.buckets, sampler_row
        )
        return token, logprob

    def round(self, next_B, length_B, sampler_args, live=None):
        """(tokens [B, N], log-probabilities [B, N], tokens made per slot [B]) of one decode round: feeds
        each slot's next token at its length (`live`: the slots in use, for statistics). Plain decoding:
        N = 1, one token each."""
        with jax.set_mesh(self.model.mesh):
            tokens, logprobs, self.cache = self._decode(
                self.model.params, self.cache, next_B, length_B, sampler_args
            )
        self.rounds += 1
        return np.asarray(tokens), np.asarray(logprobs), np.ones(len(next_B), np.int32)
