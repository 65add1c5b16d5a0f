"""Cached decoding equals the full forward: chunked prefill then token-by-token decode, logits within 1e-5
(fp32) of a no-cache forward at every position, for every mixer, on one device and on a data x tensor mesh,
with the xla path and the Pallas decode kernel (interpreted on CPU)."""

import jax
import numpy as np
import pytest
from flax import nnx
from infer_testing import MODELS, full_logits, loaded

from jaxpar.infer import model as model_lib
from jaxpar.infer.cache import cache_bytes_per_token, cache_shardings, init_cache

MESHES = {"1 device": {}, "data2 x tensor2": {"data": 2, "tensor": 2}}
PROMPT, TOTAL = 13, 20  # prefill 13 tokens (padded to 16), then decode 7 one at a time


def cached_logits(model, tokens_BT, implementation="xla", chunk=16):
    """Logits at every position of tokens_BT: the first PROMPT through prefill chunks of `chunk`
    tokens (the last one padded), the rest one decode step at a time."""
    B, T = tokens_BT.shape
    cfg = model.cfg

    def step(params, cache, tokens, positions, segments):
        return nnx.merge(model.graphdef, params).forward_cached(tokens, positions, segments, cache)

    with jax.set_mesh(model.mesh):
        make = lambda: init_cache(cfg, B, 32, "float32", implementation)
        cache = jax.jit(make, out_shardings=cache_shardings(model.mesh, jax.eval_shape(make)))()
        step = jax.jit(step)
        out = []
        for start in range(0, PROMPT, chunk):
            n = min(chunk, PROMPT - start)
            tokens = np.zeros((B, chunk), np.int32)
            tokens[:, :n] = tokens_BT[:, start : start + n]
            positions = np.broadcast_to(start + np.arange(chunk), (B, chunk)).astype(np.int32)
            segments = np.broadcast_to(np.arange(chunk) < n, (B, chunk)).astype(np.int32)
            logits, cache = step(model.params, cache, tokens, positions, segments)
            out.append(np.asarray(logits)[:, :n])
        for t in range(PROMPT, T):
            positions = np.full((B, 1), t, np.int32)
            logits, cache = step(
                model.params, cache, tokens_BT[:, t : t + 1], positions, np.ones((B, 1), np.int32)
            )
            out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("mesh", MESHES, ids=list(MESHES))
@pytest.mark.parametrize("name", MODELS, ids=list(MODELS))
def test_cached_decoding_equals_the_full_forward(name, mesh):
    model = loaded(MODELS[name], model_lib.inference_mesh(MESHES[mesh]))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, TOTAL), 0, 64), np.int32)
    np.testing.assert_allclose(cached_logits(model, tokens), full_logits(model, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [16, 32], ids=["prefill by the decode kernel", "prefill by flash"])
@pytest.mark.parametrize("name", ["dense", "sliding_window"])
def test_pallas_kernels_equal_the_full_forward(name, chunk):
    """Decode steps run the Pallas decode kernel; a prefill chunk of up to 16 tokens does too, a longer one
    runs the flash kernel (both interpreted on CPU, per device on a data x tensor mesh)."""
    model = loaded(MODELS[name], model_lib.inference_mesh({"data": 2, "tensor": 2}))
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, TOTAL), 0, 64), np.int32)
    got = cached_logits(model, tokens, implementation="pallas", chunk=chunk)
    np.testing.assert_allclose(got, full_logits(model, tokens), atol=1e-5, rtol=0)


def test_chunked_prefill_of_a_long_prompt():
    """A prompt longer than one prefill chunk: three chunks of 16 (the last padded), then decode."""
    model = loaded(MODELS["hybrid"])
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (1, TOTAL), 0, 64), np.int32)
    np.testing.assert_allclose(
        cached_logits(model, tokens, chunk=16)[:, :PROMPT],
        cached_logits(model, tokens, chunk=4)[:, :PROMPT],
        atol=1e-5,
        rtol=0,
    )


def test_cache_is_placed_by_the_rules_table():
    """Slots over the batch axes, KV heads over tensor; a dimension the mesh cannot divide stays whole."""
    mesh = model_lib.inference_mesh({"data": 2, "tensor": 2})
    cache = jax.eval_shape(lambda: init_cache(MODELS["hybrid"], 4, 32, "bfloat16"))
    specs = jax.tree.map(lambda s: tuple(s.spec), cache_shardings(mesh, cache))
    assert specs["softmax"].k_BSKH == ("pipeline", ("data", "fsdp", "expert"), None, "tensor", None)
    assert specs["linear"].state_BKHH == ("pipeline", None, ("data", "fsdp", "expert"), "tensor", None, None)
    odd = jax.eval_shape(lambda: init_cache(MODELS["dense"], 3, 32, "bfloat16"))  # 3 slots over data=2
    assert tuple(cache_shardings(mesh, odd).k_BSKH.spec)[1] is None


@pytest.mark.parametrize("name", MODELS, ids=list(MODELS))
def test_kv_bytes_per_token_match_the_allocated_cache(name):
    cfg = MODELS[name]
    slots, capacity = 3, 32
    cache = jax.eval_shape(lambda: init_cache(cfg, slots, capacity, "bfloat16"))
    kv = sum(
        int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]
        if "k_BSKH" in jax.tree_util.keystr(path) or "v_BSKH" in jax.tree_util.keystr(path)
    )
    assert kv == cache_bytes_per_token(cfg, "bfloat16") * slots * capacity
