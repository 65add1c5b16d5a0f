"""The continuous-batching generation engine.

A fixed number of slots share one KV cache ([slots, capacity] per layer). A request waits until a slot is
free, is prefilled into it (its prompt in chunks of at most `prefill_chunk` tokens, the last chunk padded
to a power-of-two bucket), and then advances one token per decode step together with every other active
request; it leaves when it stops (a stop token or string, max_tokens, the cache's capacity, or a cancel),
between two decode steps, and its slot takes the next waiting request. Nothing recompiles while requests
come and go: the compiled programs are one decode step for all slots and one prefill per bucket
(`compiled_programs()` counts them).

The engine is single-threaded and synchronous: `add` requests, call `step()` (admit waiting requests,
then one decode step) and read the events it returns; `generate` does that until all are done.
jaxpar.infer.server runs it on its own thread for the HTTP server.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import uuid
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpar.infer import sampling
from jaxpar.infer.cache import cache_shardings, init_cache, logical_names, restart
from jaxpar.infer.model import LoadedModel
from jaxpar.infer.text import TextStream

MIN_BUCKET = 16


class RequestError(ValueError):
    """A request the engine cannot serve (too long for the cache, an empty prompt, ids outside the
    vocabulary)."""


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    params: sampling.SamplingParams = sampling.SamplingParams()
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)


@dataclasses.dataclass
class Result:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


@dataclasses.dataclass(frozen=True)
class Event:
    """A generated token of a request (token_id None on the final event of a cancelled or stopped
    request), the text it adds (held back while it may be the start of a stop string), and, on the
    request's last event, why it finished ("stop", "length" or "cancelled") and the whole result."""

    request_id: str
    token_id: int | None
    logprob: float | None
    text: str
    finish_reason: str | None = None
    result: Result | None = None


@dataclasses.dataclass
class _Active:
    request: Request
    stream: TextStream
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)


def prefill_buckets(prefill_chunk: int) -> tuple[int, ...]:
    """Padded lengths of prefill chunks: powers of two from MIN_BUCKET up to prefill_chunk (included)."""
    buckets, b = [], MIN_BUCKET
    while b < prefill_chunk:
        buckets.append(b)
        b *= 2
    return (*buckets, prefill_chunk)


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
    tokens, logprobs = _sample(logits_1V, *sampler_args)
    return tokens[0], logprobs[0], _put_row(cache, row, slot)


def _decode(graphdef, params, cache, tokens_B, positions_B, sampler_args):
    """One token for every slot: feeds tokens_B at positions_B, samples the next."""
    model = nnx.merge(graphdef, params)
    ones_B1 = jnp.ones_like(tokens_B)[:, None]
    logits_B1V, cache = model.forward_cached(tokens_B[:, None], positions_B[:, None], ones_B1, cache)
    return *_sample(logits_B1V[:, 0], *sampler_args), cache


def _sample(logits_BV, seeds_B, counts_B, temperature_B, top_k_B, top_p_B, min_p_B):
    keys_B = sampling.token_keys(seeds_B, counts_B)
    return sampling.sample(logits_BV, keys_B, temperature_B, top_k_B, top_p_B, min_p_B)


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        *,
        slots: int = 8,
        capacity: int | None = None,
        prefill_chunk: int = 128,
        cache_dtype: str = "bfloat16",
        attention: str | None = None,
    ):
        cfg = model.cfg
        capacity = capacity or cfg.max_seq_len
        if not 1 <= capacity <= cfg.max_seq_len:
            raise ValueError(f"capacity={capacity} must be in [1, model.max_seq_len={cfg.max_seq_len}]")
        if slots < 1 or prefill_chunk < MIN_BUCKET or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(
                f"slots={slots} must be >= 1 and prefill_chunk={prefill_chunk} a power of two >= {MIN_BUCKET}"
            )
        self.model, self.slots, self.capacity = model, slots, capacity
        self.buckets = prefill_buckets(min(prefill_chunk, max(MIN_BUCKET, next_power_of_two(capacity))))
        make_cache = functools.partial(init_cache, cfg, slots, capacity, cache_dtype, attention)
        with jax.set_mesh(model.mesh):
            shardings = cache_shardings(model.mesh, jax.eval_shape(make_cache))
            self._new_cache = jax.jit(make_cache, out_shardings=shardings)
        self.reset()
        # The cache comes back exactly as it went in (placement spelled the same), so the next call
        # reuses the program; the sampled tokens come back replicated.
        replicated = NamedSharding(model.mesh, P())
        pinned = dict(donate_argnums=(1,), out_shardings=(replicated, replicated, shardings))
        self._prefill = jax.jit(functools.partial(_prefill, model.graphdef), **pinned)
        self._decode = jax.jit(functools.partial(_decode, model.graphdef), **pinned)
        self.cache_bytes = sum(x.nbytes for x in jax.tree.leaves(self.cache))

    def reset(self) -> None:
        """An empty cache, every slot free, no request waiting (after a failed step, whose donated cache
        is gone)."""
        with jax.set_mesh(self.model.mesh):
            self.cache = self._new_cache()
        slots = self.slots
        # Per-slot host state: the token to feed next, tokens in the cache, tokens generated, sampler.
        self._next = np.zeros(slots, np.int32)
        self._length = np.zeros(slots, np.int32)
        self._count = np.zeros(slots, np.int32)
        self._seed = np.zeros(slots, np.uint32)
        self._temperature = np.zeros(slots, np.float32)
        self._top_k = np.zeros(slots, np.int32)
        self._top_p = np.ones(slots, np.float32)
        self._min_p = np.zeros(slots, np.float32)
        self._active: list[_Active | None] = [None] * slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancelled: set[str] = set()

    # ---- requests in and out -----------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """RequestError unless the request fits: a non-empty prompt of ids in the vocabulary, and room in
        the cache for the prompt and at least one generated token."""
        ids, vocab = request.prompt_ids, self.model.cfg.vocab_size
        if not ids:
            raise RequestError("the prompt is empty; give at least one token")
        bad = [i for i in ids if not 0 <= int(i) < vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.capacity:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this engine's context holds {self.capacity} "
                "(prompt and completion together): shorten the prompt"
            )

    def add(self, request: Request) -> str:
        self.check(request)
        self._waiting.append(request)
        return request.id

    def cancel(self, request_id: str) -> None:
        """Frees the request's slot (or drops it from the queue) before the next decode step."""
        self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting) or any(a is not None for a in self._active)

    def compiled_programs(self) -> int:
        """Programs compiled so far: one decode step, one prefill per bucket used."""
        return sum(f._cache_size() for f in (self._prefill, self._decode))

    # ---- the loop ------------------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Drops cancelled requests, prefills waiting requests into free slots (each yields its first
        token), then runs one decode step for every active slot. Returns the events, in order."""
        events = self._drop_cancelled()
        for slot in range(self.slots):
            while self._active[slot] is None and self._waiting:
                events += self._admit(self._waiting.popleft(), slot)
        live = [slot for slot, a in enumerate(self._active) if a is not None]
        if not live:
            return events
        with jax.set_mesh(self.model.mesh):
            tokens, logprobs, self.cache = self._decode(
                self.model.params, self.cache, self._next, self._length, self._sampler_args()
            )
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        for slot in live:
            self._length[slot] += 1  # the fed token is in the cache now
            events += self._emit(slot, int(tokens[slot]), float(logprobs[slot]))
        return events

    def generate(self, requests: Iterable[Request], on_event=None) -> list[Result]:
        """Runs `requests` to completion (continuous batching over the slots); results in input order.
        on_event(event) sees every event as it happens (streaming)."""
        requests = list(requests)
        for request in requests:
            self.check(request)
        finished: dict[str, Result] = {}
        for request in requests:
            self.add(request)
        while self.has_work:
            for event in self.step():
                if event.result is not None:
                    finished[event.request_id] = event.result
                if on_event is not None:
                    on_event(event)
        return [finished[r.id] for r in requests]

    def _sampler_args(self):
        return (self._seed, self._count, self._temperature, self._top_k, self._top_p, self._min_p)

    def _admit(self, request: Request, slot: int) -> list[Event]:
        if request.id in self._cancelled:
            self._cancelled.discard(request.id)
            return [Event(request.id, None, None, "", "cancelled")]
        p = request.params
        self._seed[slot], self._count[slot] = p.seed, 0
        self._temperature[slot], self._top_k[slot] = p.temperature, p.top_k
        self._top_p[slot], self._min_p[slot] = p.top_p, p.min_p
        ids = np.asarray(request.prompt_ids, np.int32)
        start = 0
        with jax.set_mesh(self.model.mesh):
            while start < len(ids):
                chunk = ids[start : start + self.buckets[-1]]
                bucket = next(b for b in self.buckets if b >= len(chunk))
                padded = np.zeros((1, bucket), np.int32)
                padded[0, : len(chunk)] = chunk
                args = tuple(a[slot : slot + 1] for a in self._sampler_args())
                token, logprob, self.cache = self._prefill(
                    self.model.params,
                    self.cache,
                    np.int32(slot),
                    padded,
                    np.int32(start),
                    np.int32(len(chunk)),
                    args,
                )
                start += len(chunk)
        self._length[slot] = len(ids)
        self._active[slot] = _Active(request, TextStream(self.model.tokenizer, p.stop))
        return self._emit(slot, int(token), float(logprob))

    def _emit(self, slot: int, token: int, logprob: float) -> list[Event]:
        """Records a sampled token of `slot` and finishes the request when it stops."""
        active = self._active[slot]
        request, p = active.request, active.request.params
        self._count[slot] += 1
        if token in p.stop_token_ids or token in self.model.stop_token_ids:  # not part of the output
            return [self._finish(slot, "stop", None, None, active.stream.flush())]
        active.token_ids.append(token)
        active.logprobs.append(logprob)
        text, stopped = active.stream.push(token)
        if stopped:
            return [self._finish(slot, "stop", token, logprob, text)]
        # Another token needs room to feed this one at position length.
        if len(active.token_ids) >= p.max_tokens or self._length[slot] >= self.capacity:
            return [self._finish(slot, "length", token, logprob, text + active.stream.flush())]
        self._next[slot] = token
        return [Event(request.id, token, logprob, text)]

    def _finish(self, slot: int, reason: str, token, logprob, text: str) -> Event:
        """Frees `slot`; the request's final event, carrying its Result."""
        active = self._active[slot]
        self._active[slot] = None
        self._length[slot] = self._next[slot] = 0
        result = Result(
            request_id=active.request.id,
            prompt_ids=list(active.request.prompt_ids),
            token_ids=active.token_ids,
            text=active.stream.text,
            logprobs=active.logprobs,
            finish_reason=reason,
        )
        return Event(active.request.id, token, logprob, text, reason, result)

    def _drop_cancelled(self) -> list[Event]:
        if not self._cancelled:
            return []
        events = []
        for slot, active in enumerate(self._active):
            if active is not None and active.request.id in self._cancelled:
                self._cancelled.discard(active.request.id)
                events.append(self._finish(slot, "cancelled", None, None, ""))
        kept = collections.deque()
        for request in self._waiting:
            if request.id in self._cancelled:
                self._cancelled.discard(request.id)
                events.append(Event(request.id, None, None, "", "cancelled"))
            else:
                kept.append(request)
        self._waiting = kept
        return events


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, n - 1).bit_length()
