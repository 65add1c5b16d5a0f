"""The continuous-batching engine: greedy output equals a no-cache greedy loop, a request's output does not
depend on what else is in the batch, seeds reproduce, nothing recompiles as requests come and go, stop
rules, bad requests; and the samplers against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from infer_testing import MODELS, greedy_reference, loaded
from scipy import stats

from jaxpar.infer import sampling
from jaxpar.infer.engine import Engine, Request, RequestError
from jaxpar.infer.sampling import SamplingError, SamplingParams
from jaxpar.infer.text import ByteTokenizer, TextStream, apply_chat_template

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def dense():
    return loaded(MODELS["dense"])


def engine_of(model, **kwargs):
    return Engine(
        model, **{"slots": 2, "capacity": 48, "cache_dtype": "float32", "attention": "xla", **kwargs}
    )


@pytest.mark.parametrize("name", ["dense", "hybrid"])  # MoE: tests/test_infer_cache.py
def test_greedy_equals_a_no_cache_greedy_loop(name):
    model = loaded(MODELS[name])
    prompts = [[5, 9, 3], list(range(1, 40))]  # the second is prefilled in three chunks (16, 16, 7)
    results = engine_of(model, prefill_chunk=16).generate([Request(p, GREEDY) for p in prompts])
    for prompt, result in zip(prompts, results):
        assert result.token_ids == greedy_reference(model, prompt, 6), prompt
        assert result.finish_reason == "length"


@pytest.mark.parametrize("name", ["dense", "hybrid"])
def test_a_request_is_the_same_alone_and_among_others(name):
    """Greedy and sampled requests, alone and in a queue of five over two slots (joining and leaving
    between decode steps, taking slots others used before): identical tokens."""
    engine = engine_of(loaded(MODELS[name]))
    mine = [
        Request([7, 1, 2, 8], GREEDY),
        Request([7, 1, 2, 8], SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=11)),
    ]
    alone = [engine.generate([Request(r.prompt_ids, r.params)])[0].token_ids for r in mine]
    others = [Request([3] * n, SamplingParams(max_tokens=n, seed=n)) for n in (2, 9, 4)]
    crowd = engine.generate([others[0], mine[0], others[1], mine[1], others[2]])
    assert [crowd[1].token_ids, crowd[3].token_ids] == alone
    assert engine.compiled_programs() == 2  # one decode step, one prefill bucket (16)


def test_seeds_reproduce_and_differ(dense):
    engine = engine_of(dense)
    run = lambda seed: engine.generate([Request([1, 2, 3], SamplingParams(max_tokens=12, seed=seed))])[0]
    assert run(5).token_ids == run(5).token_ids
    assert run(5).token_ids != run(6).token_ids


def test_stop_tokens_strings_and_capacity(dense):
    engine = engine_of(dense, capacity=16)
    first = engine.generate([Request([1, 2], GREEDY)])[0].token_ids
    stopped = engine.generate(
        [Request([1, 2], SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=(first[2],)))]
    )[0]
    assert stopped.token_ids == first[:2] and stopped.finish_reason == "stop"
    long = engine.generate([Request(list(range(1, 14)), SamplingParams(max_tokens=50, temperature=0.0))])[0]
    assert len(long.token_ids) == 16 - 13 + 1 and long.finish_reason == "length"  # the cache is full


def test_cancel_frees_the_slot(dense):
    engine = engine_of(dense, slots=1)
    a, b = Request([1, 2], SamplingParams(max_tokens=40)), Request([3, 4], SamplingParams(max_tokens=3))
    engine.add(a)
    engine.add(b)
    engine.step()
    engine.cancel(a.id)
    events = []
    while engine.has_work:
        events += engine.step()
    assert [e.finish_reason for e in events if e.request_id == a.id] == ["cancelled"]
    (done,) = [e.result for e in events if e.result and e.request_id == b.id]
    assert len(done.token_ids) == 3 and done.finish_reason == "length"


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([], "the prompt is empty"),
        ([1, 64], "token id 64 is outside the vocabulary"),
        (list(range(48)), "48 tokens"),
    ],
)
def test_bad_requests_are_refused_before_running(dense, prompt, message):
    with pytest.raises(RequestError, match=message):
        engine_of(dense).add(Request(prompt, GREEDY))


@pytest.mark.parametrize(
    "field, value", [("temperature", -1.0), ("top_p", 0.0), ("min_p", 1.0), ("top_k", -1), ("max_tokens", 0)]
)
def test_sampling_values_outside_their_meaning(field, value):
    with pytest.raises(SamplingError, match=f"{field}="):
        SamplingParams(**{field: value})


# ---- samplers against their definitions -------------------------------------------------------------

LOGITS = jnp.log(jnp.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]]))


def kept(**params):
    args = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, **params}
    arrays = [jnp.array([args[k]]) for k in ("temperature", "top_k", "top_p", "min_p")]
    return np.flatnonzero(np.isfinite(np.asarray(sampling.filter_logits(LOGITS, *arrays)[0]))).tolist()


def test_filters_keep_what_their_definitions_say():
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.65) == [0, 1]  # 0.4 + 0.25 reaches 0.65
    assert kept(top_p=0.66) == [0, 1, 2]
    assert kept(min_p=0.3) == [0, 1, 2]  # p >= 0.12
    assert kept(top_k=4, top_p=0.5) == [0, 1]
    assert kept() == list(range(6))


def test_temperature_zero_is_greedy_and_samples_follow_the_filtered_distribution():
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    logits = jnp.broadcast_to(LOGITS, (n, 6))
    ones = lambda v, dtype=jnp.float32: jnp.full((n,), v, dtype)
    greedy, _ = sampling.sample(logits, keys, ones(0.0), ones(0, jnp.int32), ones(1.0), ones(0.0))
    assert set(np.asarray(greedy).tolist()) == {0}
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.8)):
        tokens, logprobs = sampling.sample(
            logits, keys, ones(temperature), ones(0, jnp.int32), ones(top_p), ones(0.0)
        )
        filtered = np.asarray(
            sampling.filter_logits(LOGITS, *(jnp.array([v]) for v in (temperature, 0, top_p, 0.0)))[0]
        )
        support = np.flatnonzero(np.isfinite(filtered))
        expected = np.exp(filtered[support].astype(np.float64) - filtered[support].max())
        expected = expected / expected.sum() * n
        observed = np.bincount(np.asarray(tokens), minlength=6)
        assert observed[np.setdiff1d(np.arange(6), support)].sum() == 0
        p_value = stats.chisquare(observed[support], expected).pvalue
        assert p_value > 1e-3, (temperature, top_p, p_value)
        np.testing.assert_allclose(np.asarray(logprobs), np.asarray(LOGITS)[0, np.asarray(tokens)], rtol=1e-5)


# ---- text -------------------------------------------------------------------------------------------


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    plain = TextStream(ByteTokenizer())
    assert [plain.push(b)[0] for b in "é".encode()] == ["", "é"]  # two bytes, one character
    stream = TextStream(ByteTokenizer(), stop=("END",))  # holds back the last 2 characters
    assert [stream.push(b) for b in "éxEN".encode()] == [
        ("", False),
        ("", False),
        ("", False),
        ("é", False),
        ("x", False),
    ]
    assert stream.push(ord("D")) == ("", True) and stream.text == "éx"


def test_chat_template_renders_messages():
    template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    text = apply_chat_template(template, [{"role": "user", "content": "hi"}])
    assert text == "<user>hi\n<assistant>"
