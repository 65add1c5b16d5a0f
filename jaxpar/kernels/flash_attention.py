"""Flash attention in Pallas (Triton lowering on GPU, interpret mode elsewhere), forward and backward.

One kernel family covers what the models need: causal or not, grouped-query attention (K key/value
heads serving N = K * G query heads), segment ids for packed documents, arbitrary query and key
positions (ring attention hands a block of queries a block of keys from elsewhere in the sequence;
causal means q_pos >= kv_pos), a sliding window, a logit soft-cap, any sequence length, bf16 / fp16 /
fp32 inputs. It also returns the log-sum-exp (float32, natural log) and that output is differentiable,
because ring attention merges partial results through it.

Layout: q_BTNH [batch, q length, heads, head dim], k/v_BSKH [batch, kv length, kv heads, head dim]; the
log-sum-exp comes back as lse_BTN. Head n reads kv head n // G.

Semantics every implementation in jaxpar.kernels.attention shares (the reference below is the
definition): key j is visible to query i when all of these hold
  - causal:       q_pos[i] >= kv_pos[j]
  - window=W:     q_pos[i] - kv_pos[j] < W  (and, when not causal, kv_pos[j] - q_pos[i] < W)
  - segment ids:  q_seg[i] == kv_seg[j]
A query that sees no key at all gets output 0 and lse = -inf (and zero gradients), never NaN. Logits
are scale * q.k, then softcap * tanh(logits / softcap) when a soft-cap is set.

Kernel design (FlashAttention-2): the forward runs one program per (query block, batch, head), looping
over key blocks with an online softmax in float32. The backward is two kernels: dq per query block
(looping over key blocks) and dk/dv per key block and kv head (looping over the G query heads of the
group and the query blocks), so GQA needs no atomics and no G-times larger dk/dv buffers. Blocks that
the mask rules out entirely are skipped with a branch decided from block-wise min/max of positions and
segment ids, which stays correct for positions in any order (it only skips less).

Ragged lengths: sequences are padded in the wrapper to a multiple of the block size (edge-padded
positions and segment ids, so padded rows behave like the last real row) and padded keys are masked by
index; lengths that are already multiples of the blocks are not copied. Head dims are padded with zeros
to a power of two >= 16 (Triton's tl.dot minimum), which changes no dot product.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# A finite stand-in for -inf on masked logits: exp(MASKED - m) is exactly 0 for any real row maximum m,
# and MASKED - MASKED is 0, not NaN, for rows that see nothing (those are zeroed explicitly).
MASKED = -1e30
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two; at least 16 when compiled for GPU). A block larger than the (padded)
    sequence is shrunk to it, so short sequences are not padded to a full block.

    The defaults are UNMEASURED: no GPU was available when this kernel was written. They follow the
    usual FlashAttention-2 Triton choices (128 x 64 forward tiles, 64 x 64 backward tiles, half that at
    head dim 256 to stay inside shared memory); tune them with experiments/bench_attention.py.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps: int | None = None  # None: 4 for head dim <= 64, else 8
    num_stages: int = 2

    @classmethod
    def for_head_dim(cls, head_dim: int) -> BlockSizes:
        if head_dim > 128:
            return cls(block_q=64, block_k=32, block_q_dq=32, block_k_dq=32, block_q_dkv=32, block_k_dkv=32)
        return cls()

    def blocks(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("block")}


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of the attention pattern (hashable: it is a jit-static argument)."""

    causal: bool
    window: int | None = None
    softcap: float | None = None
    scale: float = 1.0
    kv_len: int | None = None  # keys at index >= kv_len are padding; None: no padding

    @property
    def skips_blocks(self) -> bool:
        return self.causal or self.window is not None


# --------------------------------------------------------------------------------------------------
# Pieces shared by the kernels, the chunked XLA path and the reference. Written with `...` leading
# dimensions so that they run on kernel tiles ([bq], [bk]) and on batched arrays ([B, T]) alike.


def visible(q_pos, kv_pos, q_seg, kv_seg, spec: MaskSpec, kv_index=None):
    """Boolean [..., Tq, Tk] of keys each query may attend to, or None when every key is visible."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if spec.causal or spec.window is not None:
        diff = q_pos[..., :, None] - kv_pos[..., None, :]
        if spec.causal:
            mask = both(mask, diff >= 0)
        if spec.window is not None:
            mask = both(mask, diff < spec.window)
            if not spec.causal:
                mask = both(mask, -diff < spec.window)
    if q_seg is not None:
        mask = both(mask, q_seg[..., :, None] == kv_seg[..., None, :])
    if spec.kv_len is not None and kv_index is not None:
        mask = both(
            mask, jnp.broadcast_to(kv_index[..., None, :] < spec.kv_len, (*q_pos.shape, kv_index.shape[-1]))
        )
    return mask


def block_may_attend(q_pos, kv_pos, q_seg, kv_seg, spec: MaskSpec):
    """Scalar bool: can any query of this block see any key of that block? None when always True.

    Decided from min/max only, so it is conservative (it may say True for a block that turns out fully
    masked, never False for one that is not) whatever order the positions and segment ids come in."""
    conds = []
    if spec.causal:
        conds.append(jnp.min(kv_pos) <= jnp.max(q_pos))
    if spec.window is not None:
        conds.append(jnp.min(q_pos) - jnp.max(kv_pos) < spec.window)
        if not spec.causal:
            conds.append(jnp.min(kv_pos) - jnp.max(q_pos) < spec.window)
    if q_seg is not None:
        conds.append(jnp.min(q_seg) <= jnp.max(kv_seg))
        conds.append(jnp.min(kv_seg) <= jnp.max(q_seg))
    if not conds:
        return None
    return functools.reduce(jnp.logical_and, conds)


def capped(logits, spec: MaskSpec):
    """Scaled (and soft-capped) logits from raw dot products, float32."""
    logits = logits * spec.scale
    if spec.softcap is not None:
        logits = spec.softcap * jnp.tanh(logits / spec.softcap)
    return logits


def softcap_grad(logits, spec: MaskSpec):
    """d capped / d (scaled logits), given the capped logits: 1 - tanh^2."""
    t = logits / spec.softcap
    return 1.0 - t * t


def _dot_nt(a, b):  # a [m, h] . b [n, h]^T -> [m, n] float32
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):  # a [m, k] . b [k, n] -> [m, n] float32
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # a [k, m]^T . b [k, n] -> [m, n] float32
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def maybe_skip(pred, update, carry):
    return update(carry) if pred is None else lax.cond(pred, update, lambda c: c, carry)


# --------------------------------------------------------------------------------------------------
# Kernels.


def _forward_kernel(
    q_ref,
    k_ref,
    v_ref,
    q_pos_ref,
    kv_pos_ref,
    q_seg_ref,
    kv_seg_ref,
    o_ref,
    lse_ref,
    *,
    spec: MaskSpec,
    block_k: int,
):
    block_q, head_dim = q_ref.shape
    q = q_ref[...]
    q_pos = q_pos_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def visit(j, carry):
        kv_slice = pl.ds(j * block_k, block_k)
        kv_pos = kv_pos_ref[kv_slice]
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[kv_slice]

        def update(carry):
            acc, m, l = carry
            k, v = k_ref[kv_slice, :], v_ref[kv_slice, :]
            s = capped(_dot_nt(q, k), spec)
            mask = visible(q_pos, kv_pos, q_seg, kv_seg, spec, j * block_k + jnp.arange(block_k))
            if mask is not None:
                s = jnp.where(mask, s, MASKED)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[:, None])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            alpha = jnp.exp(m - m_new)
            l = alpha * l + jnp.sum(p, axis=-1)
            acc = alpha[:, None] * acc + _dot_nn(p.astype(v.dtype), v)
            return acc, m_new, l

        return maybe_skip(block_may_attend(q_pos, kv_pos, q_seg, kv_seg, spec), update, carry)

    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), MASKED, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, k_ref.shape[0] // block_k, visit, init)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _probs(q, k, lse_safe, q_pos, kv_pos, q_seg, kv_seg, spec, kv_index):
    """Recomputed softmax probabilities of a tile (0 where masked) and the capped logits."""
    s = capped(_dot_nt(q, k), spec)
    p = jnp.exp(s - lse_safe[:, None])
    mask = visible(q_pos, kv_pos, q_seg, kv_seg, spec, kv_index)
    if mask is not None:
        # Masked entries of exp() may be inf (lse_safe is 0 for rows that see nothing); where() drops them.
        p = jnp.where(mask, p, 0.0)
    return p, s


def finite_lse(lse):
    return jnp.where(lse > MASKED, lse, 0.0)


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_pos_ref,
    kv_pos_ref,
    q_seg_ref,
    kv_seg_ref,
    dq_ref,
    *,
    spec: MaskSpec,
    block_k: int,
):
    q, do = q_ref[...], do_ref[...]
    lse, delta = finite_lse(lse_ref[...]), delta_ref[...]
    q_pos = q_pos_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def visit(j, dq):
        kv_slice = pl.ds(j * block_k, block_k)
        kv_pos = kv_pos_ref[kv_slice]
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[kv_slice]

        def update(dq):
            k, v = k_ref[kv_slice, :], v_ref[kv_slice, :]
            p, s = _probs(q, k, lse, q_pos, kv_pos, q_seg, kv_seg, spec, j * block_k + jnp.arange(block_k))
            ds = p * (_dot_nt(do, v) - delta[:, None])
            if spec.softcap is not None:
                ds = ds * softcap_grad(s, spec)
            return dq + _dot_nn(ds.astype(k.dtype), k)

        return maybe_skip(block_may_attend(q_pos, kv_pos, q_seg, kv_seg, spec), update, dq)

    dq = lax.fori_loop(0, k_ref.shape[0] // block_k, visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_pos_ref,
    kv_pos_ref,
    q_seg_ref,
    kv_seg_ref,
    dk_ref,
    dv_ref,
    *,
    spec: MaskSpec,
    block_q: int,
):
    # q_ref/do_ref: [Tq, G, H] (every query head of this kv head's group); lse/delta: [G, Tq].
    block_k = k_ref.shape[0]
    k, v = k_ref[...], v_ref[...]
    kv_pos = kv_pos_ref[...]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    kv_index = pl.program_id(0) * block_k + jnp.arange(block_k)
    num_q_blocks = q_ref.shape[0] // block_q
    group = q_ref.shape[1]

    def visit(i, carry):
        g, qb = lax.div(i, num_q_blocks), lax.rem(i, num_q_blocks)  # both >= 0: plain div/rem lower to Triton
        q_slice = pl.ds(qb * block_q, block_q)
        q_pos = q_pos_ref[q_slice]
        q_seg = None if q_seg_ref is None else q_seg_ref[q_slice]

        def update(carry):
            dk, dv = carry
            q, do = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
            lse, delta = finite_lse(lse_ref[g, q_slice]), delta_ref[g, q_slice]
            p, s = _probs(q, k, lse, q_pos, kv_pos, q_seg, kv_seg, spec, kv_index)
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            ds = p * (_dot_nt(do, v) - delta[:, None])
            if spec.softcap is not None:
                ds = ds * softcap_grad(s, spec)
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        return maybe_skip(block_may_attend(q_pos, kv_pos, q_seg, kv_seg, spec), update, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group * num_q_blocks, visit, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------------
# pallas_call plumbing. Everything below works on padded arrays: Tq a multiple of every q block, Tk of
# every k block, head dim a power of two >= 16.


@dataclasses.dataclass(frozen=True)
class _Static:
    spec: MaskSpec
    blocks: BlockSizes
    interpret: bool


def _compiler_params(static: _Static, head_dim: int):
    if static.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    num_warps = static.blocks.num_warps or (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=static.blocks.num_stages)


def _seg_spec(seg, shape, index_map):
    return None if seg is None else pl.BlockSpec(shape, index_map)


def _forward(static: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    B, Tq, N, H = q.shape
    Tk, K = k.shape[1], k.shape[2]
    G = N // K
    bq, bk = static.blocks.block_q, static.blocks.block_k
    q_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, Tk, None, H), lambda i, b, n: (b, 0, lax.div(n, G), 0))
    q_row = lambda i, b, n: (b, i)
    kv_row = lambda i, b, n: (b, 0)
    return pl.pallas_call(
        functools.partial(_forward_kernel, spec=static.spec, block_k=bk),
        grid=(Tq // bq, B, N),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, bq), q_row),
            pl.BlockSpec((None, Tk), kv_row),
            _seg_spec(q_seg, (None, bq), q_row),
            _seg_spec(kv_seg, (None, Tk), kv_row),
        ],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tq), jnp.float32)],
        compiler_params=_compiler_params(static, H),
        interpret=static.interpret,
        name="jaxpar_flash_forward",
    )(q, k, v, q_pos, kv_pos, q_seg, kv_seg)


def _backward(static: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse_BNT, do, dlse_BNT):
    B, Tq, N, H = q.shape
    Tk, K = k.shape[1], k.shape[2]
    G = N // K
    blocks = static.blocks
    # delta_i = do_i . o_i enters every ds; the lse cotangent enters the same place with the other sign:
    # ds_ij = p_ij * (do_i . v_j - delta_i + dlse_i).
    delta_BNT = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse_BNT

    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    q_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, Tk, None, H), lambda i, b, n: (b, 0, lax.div(n, G), 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
    q_row = lambda i, b, n: (b, i)
    kv_row = lambda i, b, n: (b, 0)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=static.spec, block_k=bk),
        grid=(Tq // bq, B, N),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            q_spec,
            row_spec,
            row_spec,
            pl.BlockSpec((None, bq), q_row),
            pl.BlockSpec((None, Tk), kv_row),
            _seg_spec(q_seg, (None, bq), q_row),
            _seg_spec(kv_seg, (None, Tk), kv_row),
        ],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(static, H),
        interpret=static.interpret,
        name="jaxpar_flash_dq",
    )(q, k, v, do, lse_BNT, delta_BNT, q_pos, kv_pos, q_seg, kv_seg)

    # dk/dv: the query heads of one group, viewed as [B, Tq, K, G, H] (a free reshape).
    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    group_spec = pl.BlockSpec((None, Tq, None, G, H), lambda j, b, kh: (b, 0, kh, 0, 0))
    group_rows = pl.BlockSpec((None, None, G, Tq), lambda j, b, kh: (b, kh, 0, 0))
    kv_spec = pl.BlockSpec((None, bk, None, H), lambda j, b, kh: (b, j, kh, 0))
    q_row = lambda j, b, kh: (b, 0)
    kv_row = lambda j, b, kh: (b, j)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=static.spec, block_q=bq),
        grid=(Tk // bk, B, K),
        in_specs=[
            group_spec,
            kv_spec,
            kv_spec,
            group_spec,
            group_rows,
            group_rows,
            pl.BlockSpec((None, Tq), q_row),
            pl.BlockSpec((None, bk), kv_row),
            _seg_spec(q_seg, (None, Tq), q_row),
            _seg_spec(kv_seg, (None, bk), kv_row),
        ],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(static, H),
        interpret=static.interpret,
        name="jaxpar_flash_dkv",
    )(
        q.reshape(B, Tq, K, G, H),
        k,
        v,
        do.reshape(B, Tq, K, G, H),
        lse_BNT.reshape(B, K, G, Tq),
        delta_BNT.reshape(B, K, G, Tq),
        q_pos,
        kv_pos,
        q_seg,
        kv_seg,
    )
    return dq, dk, dv


def attention_vjp(forward, backward):
    """f(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (o, lse) with a custom VJP, from
    forward(same arguments) -> (o, lse) and backward(same arguments, o, lse, do, dlse) -> (dq, dk, dv).
    The residuals are the inputs and (o, lse); positions and segment ids get no cotangent. Shared by
    this kernel and the blockwise xla path (jaxpar.kernels.chunked_attention)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def f(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        return forward(static, q, k, v, q_pos, kv_pos, q_seg, kv_seg)

    def f_fwd(static, *inputs):
        o, lse = forward(static, *inputs)
        return (o, lse), (*inputs, o, lse)

    def f_bwd(static, residuals, cotangents):
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse = residuals
        do, dlse = cotangents
        dq, dk, dv = backward(
            static,
            q,
            k,
            v,
            q_pos,
            kv_pos,
            q_seg,
            kv_seg,
            o,
            lse,
            do.astype(q.dtype),
            dlse.astype(jnp.float32),
        )
        return dq, dk, dv, None, None, None, None

    f.defvjp(f_fwd, f_bwd)
    return f


_flash = attention_vjp(_forward, _backward)


# --------------------------------------------------------------------------------------------------
# Public wrapper.


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def default_interpret() -> bool:
    """Pallas' Triton lowering needs an NVIDIA GPU; everywhere else the kernel runs interpreted."""
    return jax.default_backend() != "gpu"


def check_inputs(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    q_segment_ids_BT=None,
    kv_segment_ids_BS=None,
    q_positions_BT=None,
    kv_positions_BS=None,
    window=None,
    softcap=None,
) -> None:
    """ValueError naming the first input this kernel family cannot take (shared with the reference)."""
    if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or v_BSKH.ndim != 4:
        raise ValueError(
            f"attention wants q [B, T, N, H] and k, v [B, S, K, H]; got q{q_BTNH.shape}, "
            f"k{k_BSKH.shape}, v{v_BSKH.shape}"
        )
    B, Tq, N, H = q_BTNH.shape
    if k_BSKH.shape != v_BSKH.shape:
        raise ValueError(f"k{k_BSKH.shape} and v{v_BSKH.shape} must have the same shape")
    Bk, Tk, K, Hk = k_BSKH.shape
    if Bk != B or Hk != H:
        raise ValueError(f"q{q_BTNH.shape} and k{k_BSKH.shape} disagree on batch or head dim")
    if N % K:
        raise ValueError(
            f"query heads {N} are not a multiple of key/value heads {K} (grouped-query attention "
            "needs every kv head to serve the same number of query heads)"
        )
    if not (q_BTNH.dtype == k_BSKH.dtype == v_BSKH.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q_BTNH.dtype}, {k_BSKH.dtype}, {v_BSKH.dtype}")
    for name, x, shape in (
        ("q_segment_ids", q_segment_ids_BT, (B, Tq)),
        ("kv_segment_ids", kv_segment_ids_BS, (B, Tk)),
        ("q_positions", q_positions_BT, (B, Tq)),
        ("kv_positions", kv_positions_BS, (B, Tk)),
    ):
        if x is not None and (tuple(x.shape) != shape or not jnp.issubdtype(x.dtype, jnp.integer)):
            raise ValueError(
                f"{name} must be an integer array of shape {shape}; got {x.dtype}{tuple(x.shape)}"
            )
    if (q_segment_ids_BT is None) != (kv_segment_ids_BS is None):
        raise ValueError("give segment ids for both queries and keys, or for neither")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window={window} must be a positive integer (keys with q_pos - kv_pos < window)")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap} must be positive")


@functools.partial(
    jax.jit, static_argnames=("causal", "window", "softcap", "scale", "block_sizes", "interpret")
)
def flash_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    *,
    q_segment_ids_BT=None,
    kv_segment_ids_BS=None,
    q_positions_BT=None,
    kv_positions_BS=None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
):
    """Attention output [B, Tq, N, H] (input dtype) and log-sum-exp [B, Tq, N] (float32, natural log).

    Both outputs are differentiable in q, k and v. Positions default to 0..T-1 for queries and keys
    alike (so causal with Tq != Tk is top-left aligned); pass them to place blocks anywhere.
    `interpret=None` interprets everywhere but on a GPU.
    """
    check_inputs(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        q_segment_ids_BT,
        kv_segment_ids_BS,
        q_positions_BT,
        kv_positions_BS,
        window,
        softcap,
    )
    B, Tq, N, H = q_BTNH.shape
    Tk = k_BSKH.shape[1]
    if q_BTNH.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flash attention supports {[str(d) for d in SUPPORTED_DTYPES]}, not {q_BTNH.dtype}")
    if H > MAX_HEAD_DIM:
        raise ValueError(f"flash attention supports head dims up to {MAX_HEAD_DIM}; got {H}")
    interpret = default_interpret() if interpret is None else interpret
    blocks = BlockSizes.for_head_dim(H) if block_sizes is None else block_sizes
    min_block = 1 if interpret else 16
    for name, size in blocks.blocks().items():
        if not _is_pow2(size) or size < min_block:
            raise ValueError(
                f"BlockSizes.{name}={size} must be a power of two"
                + ("" if interpret else " >= 16 (Triton's smallest dot tile)")
            )
    # Shrink blocks to the sequence (rounded up to a power of two, and to 16 for Triton's dot).
    q_cap, k_cap = max(min_block, pl.next_power_of_2(Tq)), max(min_block, pl.next_power_of_2(Tk))
    blocks = dataclasses.replace(
        blocks,
        block_q=min(blocks.block_q, q_cap),
        block_q_dq=min(blocks.block_q_dq, q_cap),
        block_q_dkv=min(blocks.block_q_dkv, q_cap),
        block_k=min(blocks.block_k, k_cap),
        block_k_dq=min(blocks.block_k_dq, k_cap),
        block_k_dkv=min(blocks.block_k_dkv, k_cap),
    )
    Tq_pad = round_up(Tq, max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv))
    Tk_pad = round_up(Tk, max(blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv))
    H_pad = max(16, pl.next_power_of_2(H))

    scale = H**-0.5 if scale is None else float(scale)
    spec = MaskSpec(
        causal=bool(causal),
        window=None if window is None else int(window),
        softcap=None if softcap is None else float(softcap),
        scale=scale,
        kv_len=Tk if Tk_pad != Tk else None,
    )

    def pad(x, length, edge=False):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, length - x.shape[1])
        if x.ndim == 4:
            widths[3] = (0, H_pad - H)
        if all(w == (0, 0) for w in widths):
            return x
        return jnp.pad(x, widths, mode="edge" if edge else "constant")

    q_pos = pad(
        jnp.broadcast_to(jnp.arange(Tq, dtype=jnp.int32), (B, Tq))
        if q_positions_BT is None
        else q_positions_BT.astype(jnp.int32),
        Tq_pad,
        edge=True,
    )
    kv_pos = pad(
        jnp.broadcast_to(jnp.arange(Tk, dtype=jnp.int32), (B, Tk))
        if kv_positions_BS is None
        else kv_positions_BS.astype(jnp.int32),
        Tk_pad,
        edge=True,
    )
    q_seg = None if q_segment_ids_BT is None else pad(q_segment_ids_BT.astype(jnp.int32), Tq_pad, edge=True)
    kv_seg = (
        None if kv_segment_ids_BS is None else pad(kv_segment_ids_BS.astype(jnp.int32), Tk_pad, edge=True)
    )

    o, lse_BNT = _flash(
        _Static(spec, blocks, bool(interpret)),
        pad(q_BTNH, Tq_pad),
        pad(k_BSKH, Tk_pad),
        pad(v_BSKH, Tk_pad),
        q_pos,
        kv_pos,
        q_seg,
        kv_seg,
    )
    return o[:, :Tq, :, :H], jnp.swapaxes(lse_BNT[:, :, :Tq], 1, 2)


# --------------------------------------------------------------------------------------------------
# Reference.


def reference_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    *,
    q_segment_ids_BT=None,
    kv_segment_ids_BS=None,
    q_positions_BT=None,
    kv_positions_BS=None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
):
    """Dense attention in plain jnp: the definition the kernels are tested against, and the `xla`
    implementation for short sequences. Materialises [B, N, Tq, Tk] logits. Softmax in float32 (float64
    when the inputs are float64, as in the tests' reference). Returns (out_BTNH, lse_BTN)."""
    check_inputs(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        q_segment_ids_BT,
        kv_segment_ids_BS,
        q_positions_BT,
        kv_positions_BS,
        window,
        softcap,
    )
    B, Tq, N, H = q_BTNH.shape
    Tk, K = k_BSKH.shape[1], k_BSKH.shape[2]
    acc_dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
    spec = MaskSpec(causal=causal, window=window, softcap=softcap, scale=H**-0.5 if scale is None else scale)
    q_pos = jnp.arange(Tq)[None] if q_positions_BT is None else q_positions_BT
    kv_pos = jnp.arange(Tk)[None] if kv_positions_BS is None else kv_positions_BS
    mask_BTS = visible(q_pos, kv_pos, q_segment_ids_BT, kv_segment_ids_BS, spec)

    q_BTKGH = q_BTNH.reshape(B, Tq, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=acc_dtype)
    logits = capped(logits.astype(acc_dtype), spec)
    if mask_BTS is not None:
        mask = jnp.broadcast_to(mask_BTS, (B, Tq, Tk))[:, None, None]
        logits = jnp.where(mask, logits, -jnp.inf)
    # The row maximum only keeps exp() in range; it cancels exactly, so no gradient flows through it, and
    # rows that see nothing (max -inf) use 0 so that nothing in them becomes NaN.
    m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    if mask_BTS is not None:
        p = jnp.where(mask, p, 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    out = jnp.einsum(
        "bkgts,bskh->btkgh", (p / l_safe).astype(v_BSKH.dtype), v_BSKH, preferred_element_type=acc_dtype
    )
    lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)[..., 0]  # [B, K, G, T]
    return out.reshape(B, Tq, N, H).astype(q_BTNH.dtype), lse.reshape(B, N, Tq).swapaxes(1, 2)


def flops(
    batch: int, q_len: int, kv_len: int, heads: int, head_dim: int, causal: bool, backward: bool
) -> float:
    """Matmul FLOPs by the usual FlashAttention convention: 4*B*N*Tq*Tk*H forward (halved when causal
    and Tq == Tk), backward 2.5x forward (5 matmuls, one a recompute)."""
    fwd = 4.0 * batch * heads * q_len * kv_len * head_dim
    if causal and q_len == kv_len:
        fwd /= 2
    return fwd * (3.5 if backward else 1.0)


__all__ = [
    "BlockSizes",
    "MaskSpec",
    "flash_attention",
    "reference_attention",
    "check_inputs",
    "flops",
    "default_interpret",
    "visible",
    "block_may_attend",
    "capped",
    "softcap_grad",
    "MASKED",
]
