"""The continuous-batching generation engine.

A fixed number of slots share one KV cache ([slots, capacity] per layer). A request waits until a slot is
free, is prefilled into it (its prompt in chunks of at most `prefill_chunk` tokens, the last chunk padded
to a power-of-two bucket), and then advances one token per decode round together with every other active
request (with a draft model, jaxpar.infer.speculative, up to num_draft + 1 tokens per round); it leaves
when it stops (a stop token or string, max_tokens, the cache's capacity, or a cancel), between two rounds,
and its slot takes the next waiting request. Nothing recompiles while requests come and go: the compiled
programs are one decode round for all slots and one prefill per bucket and model (`compiled_programs()`
counts them; jaxpar.infer.decoder holds them).

The engine is single-threaded and synchronous: `add` requests, call `step()` (admit waiting requests,
then one decode round) and read the events it returns; `generate` does that until all are done.
jaxpar.infer.server runs it on its own thread for the HTTP server.
"""

from __future__ import annotations

import collections
import dataclasses
import uuid
from collections.abc import Iterable

import numpy as np

from jaxpar.infer import sampling
from jaxpar.infer.decoder import MIN_BUCKET, Decoder
from jaxpar.infer.medusa import MedusaDecoder
from jaxpar.infer.model import LoadedModel
from jaxpar.infer.speculative import SpeculativeDecoder
from jaxpar.infer.text import TextStream


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
        draft: LoadedModel | None = None,
        num_draft: int = 4,
        adaptive_draft: bool = False,
        medusa_width: int = 0,
        medusa_candidates: int = 16,
    ):
        """`draft`: a smaller model with the same vocabulary for speculative sampling
        (jaxpar.infer.speculative), proposing `num_draft` tokens per round (adaptive_draft: a number in
        1..num_draft chosen every round); outputs follow the target's distribution exactly either way.
        `medusa_width` > 0: Medusa decoding with the model's own heads (jaxpar.infer.medusa), a candidate
        tree of `medusa_width` choices per head and at most `medusa_candidates` nodes; exact likewise."""
        cfg = model.cfg
        capacity = capacity or cfg.max_seq_len
        if not 1 <= capacity <= cfg.max_seq_len:
            raise ValueError(f"capacity={capacity} must be in [1, model.max_seq_len={cfg.max_seq_len}]")
        if slots < 1 or prefill_chunk < MIN_BUCKET or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(
                f"slots={slots} must be >= 1 and prefill_chunk={prefill_chunk} a power of two >= {MIN_BUCKET}"
            )
        self.model, self.slots, self.capacity = model, slots, capacity
        args = (slots, capacity, prefill_chunk, cache_dtype, attention)
        if medusa_width and draft is not None:
            raise ValueError("choose one of a draft model and Medusa heads, not both")
        if medusa_width:
            self.decoder = MedusaDecoder(model, *args, width=medusa_width, candidates=medusa_candidates)
        elif draft is None:
            self.decoder = Decoder(model, *args)
        else:
            self.decoder = SpeculativeDecoder(model, draft, num_draft, *args, adaptive=adaptive_draft)
        self.cache_bytes = self.decoder.cache_bytes
        self.slot_rounds = 0  # decoding rounds summed over the slots active in them
        self._clear()

    def reset(self) -> None:
        """An empty cache, every slot free, no request waiting (after a failed step, whose donated cache
        is gone)."""
        self.decoder.reset()
        self._clear()

    def _clear(self) -> None:
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
        """Programs compiled so far: one decode round, one prefill per bucket used (per model)."""
        return self.decoder.compiled_programs()

    # ---- the loop ------------------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Drops cancelled requests, prefills waiting requests into free slots (each yields its first
        token), then runs one decode round for every active slot (one token each, or with a draft model
        up to num_draft + 1). Returns the events, in order."""
        events = self._drop_cancelled()
        for slot in range(self.slots):
            while self._active[slot] is None and self._waiting:
                events += self._admit(self._waiting.popleft(), slot)
        live = [slot for slot, a in enumerate(self._active) if a is not None]
        if not live:
            return events
        tokens, logprobs, made = self.decoder.round(self._next, self._length, self._sampler_args(), live)
        self.slot_rounds += len(live)
        for slot in live:
            for j in range(made[slot]):
                self._length[slot] += 1  # the token fed before this one is in the cache now
                events += self._emit(slot, int(tokens[slot, j]), float(logprobs[slot, j]))
                if self._active[slot] is None:  # finished: the rest of the round is dropped
                    break
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
        token, logprob = self.decoder.prefill(
            slot, ids, tuple(a[slot : slot + 1] for a in self._sampler_args())
        )
        self._length[slot] = len(ids)
        self._active[slot] = _Active(request, TextStream(self.model.tokenizer, p.stop))
        return self._emit(slot, token, logprob)

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
