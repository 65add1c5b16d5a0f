"""Speculative sampling with a draft model: greedy output equals plain greedy token for token; sampled
tokens follow the target's (filtered) distribution exactly, by a chi-square test over 20000 rows of two
rounds; the rejection rule against its definition on fixed distributions; bad pairs refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from infer_testing import MODELS, greedy_reference, loaded
from scipy import stats

from jaxpar.infer import sampling, speculative
from jaxpar.infer.cache import init_cache
from jaxpar.infer.engine import Engine, Request
from jaxpar.infer.sampling import SamplingParams

SMALL_VOCAB = dataclasses.replace(MODELS["dense"], vocab_size=8)


def test_greedy_equals_plain_greedy():
    target, draft = loaded(MODELS["dense"], seed=0), loaded(MODELS["dense"], seed=1)
    prompts = [[5, 9, 3], [7] * 12, [1, 2]]
    for k in (1, 3):
        engine = Engine(
            target, slots=2, capacity=48, cache_dtype="float32", attention="xla", draft=draft, num_draft=k
        )
        results = engine.generate(
            [Request(p, SamplingParams(max_tokens=9, temperature=0.0)) for p in prompts]
        )
        for prompt, result in zip(prompts, results):
            assert result.token_ids == greedy_reference(target, prompt, 9), (k, prompt)


def test_a_draft_equal_to_the_target_is_always_accepted():
    target = loaded(MODELS["dense"])
    engine = Engine(
        target, slots=1, capacity=48, cache_dtype="float32", attention="xla", draft=target, num_draft=4
    )
    (result,) = engine.generate([Request([3, 4], SamplingParams(max_tokens=11, seed=2))])
    assert len(result.token_ids) == 11
    assert engine.decoder.rounds == 2  # 1 token from the prefill, then 5 per round (4 accepted + bonus)


def exact_pair_distribution(target, context, filters):
    """P(t1, t2 | context) under the target's filtered distributions, [V, V], from full forwards."""
    V = target.cfg.vocab_size

    def probs(rows):
        rows = jnp.asarray(rows, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(rows.shape[1]), rows.shape)
        logits = nnx.merge(target.graphdef, target.params)(rows, positions, jnp.zeros_like(rows))[:, -1]
        n = rows.shape[0]
        return np.asarray(sampling.distribution(logits, *(jnp.full((n,), f) for f in filters)), np.float64)

    first = probs([context])[0]
    second = probs([context + [t] for t in range(V)])
    return first[:, None] * second


def pair_chi_square_p_value(first, second, expected) -> float:
    """Chi-square p-value of the observed pairs (first[i], second[i]) of an 8-token vocabulary against
    `expected` counts [64]; asserts first that no pair falls outside the expected support. Cells expected
    below 5 are pooled into one (the test is valid for the rest)."""
    observed = np.bincount(first * 8 + second, minlength=64).astype(np.float64)
    assert observed[expected == 0].sum() == 0  # nothing outside the filtered support
    big = expected >= 5
    observed = np.append(observed[big], observed[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    return stats.chisquare(observed[keep], expected[keep] * observed.sum() / expected[keep].sum()).pvalue


@pytest.mark.parametrize(
    "filters", [(1.0, 0, 1.0, 0.0), (0.8, 5, 0.9, 0.0)], ids=["plain", "t0.8 top-k5 top-p0.9"]
)
def test_sampled_tokens_follow_the_targets_distribution(filters):
    """Two rounds of k=2 for 20000 rows (each its own seed) from one context: the first two emitted tokens
    (from the first round, or the second where the first accepted nothing) against the exact joint."""
    target, draft = loaded(SMALL_VOCAB, seed=0), loaded(SMALL_VOCAB, seed=1)
    B, k, context = 20000, 2, [3, 1, 4]
    temperature, top_k, top_p, min_p = filters
    caches = []
    for model in (target, draft):  # every row holds the context but its last token
        cache = init_cache(model.cfg, B, 16, "float32", "xla")
        rows = jnp.broadcast_to(jnp.asarray(context[:-1]), (B, len(context) - 1))
        positions = jnp.broadcast_to(jnp.arange(len(context) - 1), rows.shape)
        merged = nnx.merge(model.graphdef, model.params)
        caches.append(merged.forward_cached(rows, positions, jnp.ones_like(rows), cache)[1])
    fn = jax.jit(lambda *a: speculative._speculate((target.graphdef, draft.graphdef), k, *a))
    params = (target.params, draft.params)
    length = np.full(B, len(context) - 1, np.int32)
    next_ = np.full(B, context[-1], np.int32)
    sampler = lambda counts: (  # noqa: E731
        np.arange(B, dtype=np.uint32),
        counts,
        np.full(B, temperature, np.float32),
        np.full(B, top_k, np.int32),
        np.full(B, top_p, np.float32),
        np.full(B, min_p, np.float32),
    )
    tokens1, _, made1, caches = fn(params, tuple(caches), next_, length, sampler(np.zeros(B, np.int32)))
    tokens1, made1 = np.asarray(tokens1), np.asarray(made1)
    rows = np.arange(B)
    tokens2, _, _, _ = fn(
        params, caches, tokens1[rows, made1 - 1], length + made1, sampler(made1.astype(np.int32))
    )
    first = tokens1[:, 0]
    second = np.where(made1 >= 2, tokens1[:, 1], np.asarray(tokens2)[:, 0])
    assert 0 < np.mean(made1 == 1) < 1  # the draft differs: some rows reject, some accept
    expected = exact_pair_distribution(target, context, filters).ravel() * B
    p_value = pair_chi_square_p_value(first, second, expected)
    assert p_value > 1e-3, p_value


def test_rejection_rule_on_fixed_distributions():
    """With p fixed, the first emitted token is distributed as p[0], whatever q proposes."""
    B, K, V = 40000, 2, 4
    p = jnp.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    q = jnp.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    keys = jax.random.split(jax.random.key(0), B)
    drafts = jax.vmap(lambda key: jax.vmap(jax.random.categorical)(jax.random.split(key, K), jnp.log(q)))(
        keys
    )
    m, tokens = speculative.accept(
        drafts.astype(jnp.int32),
        jnp.broadcast_to(q, (B, K, V)),
        jnp.broadcast_to(p, (B, K + 1, V)),
        jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 7),
    )
    observed = np.bincount(np.asarray(tokens[:, 0]), minlength=V)
    assert stats.chisquare(observed, np.asarray(p[0]) * B).pvalue > 1e-3
    acceptance = float(np.sum(np.minimum(p[0], q[0])))  # P(accept the first proposal) = sum min(p, q)
    assert abs(np.mean(np.asarray(m) >= 1) - acceptance) < 0.01


def test_bad_pairs_are_refused():
    target = loaded(MODELS["dense"])
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(target, draft=loaded(SMALL_VOCAB), attention="xla")
    with pytest.raises(ValueError, match="mixer='hybrid'"):
        Engine(target, draft=loaded(MODELS["hybrid"]), attention="xla")


def test_adaptive_draft_length_stays_exact():
    """Every round is exact whatever its k: greedy equals plain greedy while the choice tries k = 1 and
    k = 4 (EXPLORE = 3 timed rounds each; the programs compiled when the engine was made)."""
    target, draft = loaded(MODELS["dense"], seed=0), loaded(MODELS["dense"], seed=1)
    engine = Engine(
        target,
        slots=2,
        capacity=48,
        cache_dtype="float32",
        attention="xla",
        draft=draft,
        num_draft=4,
        adaptive_draft=True,
    )
    prompts = [[5, 9, 3], [1, 2]]
    results = engine.generate([Request(p, SamplingParams(max_tokens=24, temperature=0.0)) for p in prompts])
    for prompt, result in zip(prompts, results):
        assert result.token_ids == greedy_reference(target, prompt, 24)
    assert engine.decoder.chosen[:6] == [1, 1, 1, 4, 4, 4]
    assert engine.compiled_programs() == 2 + 3  # prefill of target and draft; rounds for k = 1, 2, 4


@pytest.mark.parametrize("accepted, tried, best", [(95, 100, 8), (5, 100, 1)])
def test_draft_length_choice_follows_acceptance_and_cost(accepted, tried, best):
    """Rounds cost 1 + 0.1 k: a draft that is nearly always right earns the longest k, a poor one k = 1."""
    assert speculative.DraftLength(6).choices == (1, 2, 4, 6)
    choice = speculative.DraftLength(8)
    for k in (1, 8):
        for _ in range(choice.EXPLORE):
            choice.record(k, [], 1.0 + 0.1 * k)
    choice.accepted, choice.tried = accepted, tried
    assert choice.choose() == best
