"""The Pallas kernels lower to Triton IR for a CUDA GPU, checked on a machine without one.

Interpret mode (what the numerical tests run) executes the kernel body as XLA ops, so it cannot catch
an operation that Pallas' Triton lowering does not support, a non-power-of-two tile, or a dot below
Triton's 16-wide minimum. Lowering for the "cuda" platform runs that lowering for real (no GPU needed);
what it cannot check is Triton's own compilation to PTX (register and shared-memory limits) and speed.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from jaxpar.kernels import decode_attention as da, flash_attention as fa


def _triton_kernels(fn, *args) -> list[str]:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
    return re.findall(r'name = "(jaxpar_\w+)"', text)


@pytest.mark.parametrize(
    "dtype, head_dim, features",
    [
        ("bfloat16", 256, dict(causal=True, window=256, softcap=30.0, segments=True)),
        ("float32", 64, dict(causal=False)),
        ("bfloat16", 24, dict(causal=True, segments=True)),  # padded head dim, ragged length
    ],
)
def test_flash_attention_lowers_to_triton(dtype, head_dim, features):
    B, T, N, K = 2, 1000, 8, 2
    q = jax.ShapeDtypeStruct((B, T, N, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((B, T + 37, K, head_dim), dtype)
    seg_q, seg_kv = jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T + 37), jnp.int32)
    features = dict(features)
    segments = features.pop("segments", False)

    def fwd_bwd(q, k, v, seg_q, seg_kv):
        def loss(q, k, v):
            out, lse = fa.flash_attention(
                q,
                k,
                v,
                q_segment_ids_BT=seg_q if segments else None,
                kv_segment_ids_BS=seg_kv if segments else None,
                interpret=False,
                **features,
            )
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    kernels = _triton_kernels(fwd_bwd, q, kv, kv, seg_q, seg_kv)
    assert sorted(kernels) == ["jaxpar_flash_dkv", "jaxpar_flash_dq", "jaxpar_flash_forward"]


def test_decode_attention_lowers_to_triton():
    q = jax.ShapeDtypeStruct((4, 2, 8, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4, 4000, 2, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
    fn = lambda q, k, v, n: da.decode_attention(q, k, v, n, window=1024, softcap=30.0, interpret=False)
    assert _triton_kernels(fn, q, cache, cache, lengths) == ["jaxpar_decode_attention"]


def test_small_blocks_are_refused_for_gpu():
    q = jnp.zeros((1, 32, 2, 64), jnp.bfloat16)
    blocks = fa.BlockSizes(
        block_q=8, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16, block_k_dkv=16
    )
    with pytest.raises(ValueError, match="block_q=8 must be a power of two >= 16"):
        fa.flash_attention(q, q, q, block_sizes=blocks, interpret=False)
