"""Sampling the next token: greedy, temperature, top-k, top-p (nucleus), min-p, per request.

Every slot of a decode batch carries its own parameters (arrays over slots), so requests with different
settings share one compiled program. Randomness is per request: the key of a request's n-th token is
fold_in(key(seed), n), so the same seed gives the same output whatever else is in the batch.

Definitions (applied in this order to the logits divided by the temperature):
  top_k > 0   keep the k most likely tokens (ties at the k-th value kept as well)
  top_p < 1   keep the smallest set of most likely tokens whose probability reaches top_p
  min_p > 0   keep tokens whose probability is at least min_p times the most likely one's
  temperature 0 is greedy (argmax of the raw logits) whatever the other settings.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


class SamplingError(ValueError):
    """A sampling parameter outside its meaning (the server answers 400 with the message)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    def __post_init__(self):
        checks = (
            ("max_tokens", self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_k", self.top_k >= 0, "an integer >= 0 (0: off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1: off)"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1) (0: off)"),
            ("seed", 0 <= self.seed < 2**32, "an integer in [0, 2**32)"),
        )
        for name, ok, must in checks:
            if not ok:
                raise SamplingError(f"{name}={getattr(self, name)!r} must be {must}")
        for name in ("max_tokens", "top_k", "seed"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise SamplingError(f"{name}={getattr(self, name)!r} must be an integer")


def filter_logits(logits_BV, temperature_B, top_k_B, top_p_B, min_p_B):
    """The logits divided by the temperature with the filtered-out tokens at -inf (float32)."""
    V = logits_BV.shape[-1]
    scaled_BV = logits_BV.astype(jnp.float32) / jnp.maximum(temperature_B, 1e-6)[:, None]
    sorted_BV = jnp.sort(scaled_BV, axis=-1)[:, ::-1]
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
    kth_B = jnp.take_along_axis(sorted_BV, (k_B - 1)[:, None], axis=-1)[:, 0]
    probs_sorted_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # top-p: the value of the first token at which the cumulative probability reaches top_p.
    before_BV = jnp.cumsum(probs_sorted_BV, axis=-1) - probs_sorted_BV
    last_B = jnp.sum(before_BV < top_p_B[:, None], axis=-1) - 1
    pth_B = jnp.take_along_axis(sorted_BV, last_B[:, None], axis=-1)[:, 0]
    # min-p: probability >= min_p * p_max  <=>  logit >= max + log(min_p).
    minth_B = jnp.where(min_p_B > 0, sorted_BV[:, 0] + jnp.log(jnp.maximum(min_p_B, 1e-30)), -jnp.inf)
    threshold_B = jnp.maximum(jnp.maximum(kth_B, pth_B), minth_B)
    return jnp.where(scaled_BV >= threshold_B[:, None], scaled_BV, -jnp.inf)


def distribution(logits_BV, temperature_B, top_k_B, top_p_B, min_p_B):
    """The probabilities `sample` draws from [B, V] (float32): the filtered softmax, or for temperature 0
    all mass on the argmax of the raw logits."""
    logits_BV = logits_BV.astype(jnp.float32)
    probs_BV = jax.nn.softmax(filter_logits(logits_BV, temperature_B, top_k_B, top_p_B, min_p_B), axis=-1)
    greedy_BV = jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1], dtype=jnp.float32)
    return jnp.where((temperature_B > 0)[:, None], probs_BV, greedy_BV)


def sample(logits_BV, keys_B, temperature_B, top_k_B, top_p_B, min_p_B):
    """(tokens [B] int32, log-probabilities [B] of those tokens under the model's unfiltered distribution)."""
    logits_BV = logits_BV.astype(jnp.float32)
    filtered_BV = filter_logits(logits_BV, temperature_B, top_k_B, top_p_B, min_p_B)
    drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BV)
    tokens_B = jnp.where(temperature_B > 0, drawn_B, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)
    logprobs_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), tokens_B[:, None], axis=-1)[:, 0]
    return tokens_B, logprobs_B


def token_keys(seeds_B, counts_B):
    """The PRNG key of each row's next token: fold_in(key(seed), tokens generated so far)."""
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds_B, counts_B)
