"""The Pallas decode kernel (interpret mode on CPU) against a float64 reference: GQA, several query
tokens, per-sequence lengths from 0 to the full cache, slices that are empty, window and soft-cap."""

import jax
import numpy as np
import pytest

from jaxpar.kernels.decode_attention import DecodeBlockSizes, decode_attention, decode_attention_reference

TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}


@pytest.mark.parametrize(
    "dtype, T, K, G, H, kwargs",
    [
        ("float32", 1, 2, 4, 24, {}),
        ("bfloat16", 3, 1, 8, 64, dict(window=20, softcap=5.0)),
    ],
)
def test_decode_matches_reference(dtype, T, K, G, H, kwargs):
    B, S = 4, 100  # S is not a multiple of split_len * block_k: the last slice is ragged
    rng = np.random.default_rng(0)
    q, k, v = (
        jax.numpy.asarray(rng.standard_normal(shape), dtype)
        for shape in ((B, T, K * G, H), (B, S, K, H), (B, S, K, H))
    )
    lengths = np.array([S, 37, T - 1 if T > 1 else 0, 5], np.int32)  # full, mid, nothing visible, short
    blocks = DecodeBlockSizes(block_k=16, num_splits=4)
    got = decode_attention(q, k, v, lengths, block_sizes=blocks, **kwargs)
    with jax.enable_x64(True):
        want = np.asarray(
            decode_attention_reference(*(np.asarray(x, np.float64) for x in (q, k, v)), lengths, **kwargs)
        )
    assert got.dtype == q.dtype and got.shape == q.shape
    got = np.asarray(got, np.float64)
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= TOLERANCE[dtype], err
    # A query that sees nothing gets exactly 0 (sequence 2's first token has position -1).
    assert np.all(got[2, 0] == 0) and np.all(want[2, 0] == 0)


def test_decode_rejects_bad_lengths():
    q = jax.numpy.zeros((2, 1, 4, 16))
    k = jax.numpy.zeros((2, 32, 2, 16))
    with pytest.raises(ValueError, match=r"lengths must be an integer array of shape \(2,\)"):
        decode_attention(q, k, k, np.zeros((3,), np.int32))
