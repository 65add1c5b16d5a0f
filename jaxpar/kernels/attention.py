"""The one attention API: `attention(q, k, v, ...)` with the implementation chosen by name.

Implementations (IMPLEMENTATIONS):
  xla     plain jnp, every backend. Dense (materialises [B, N, Tq, Tk] logits) while Tq * Tk is at most
          DENSE_MAX_LOGITS, blockwise above that (jaxpar.kernels.chunked_attention: scans over chunks with
          a recomputing custom VJP, nothing of size Tq x Tk). `xla_chunk_size` forces the blockwise path.
  pallas  our Pallas flash-attention kernel (jaxpar.kernels.flash_attention) on GPU, interpreted on CPU
          (slow; for tests); on TPU the splash-attention kernel shipped with jax.
  cudnn   jax.nn.dot_product_attention's cuDNN path; NVIDIA GPU only, bf16/fp16, no segment ids,
          positions, soft-cap or lse.
  auto    (or None) the first implementation that supports the inputs, in the order
          GPU: cudnn, pallas, xla; TPU: pallas, xla; CPU: xla. The GPU order follows public reference
          points (cuDNN ahead of Pallas Triton kernels); it has not been measured on this project's GPUs.

An implementation named explicitly that cannot handle the inputs raises AttentionUnsupportedError
naming every unsupported feature; nothing falls back silently. Semantics (masking, positions, fully
masked rows -> output 0 and lse -inf) are defined by jaxpar.kernels.flash_attention.reference_attention.

This module knows no mesh: `attention` computes on the arrays it is given. The custom kernels
(pallas, cudnn) are not partitioned by GSPMD, so under a mesh they run per device:
jaxpar.parallel.sequence.sequence_attention (the model's entry point) does that over batch and head shards,
and ring / Ulysses attention call `attention` on their own shards.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpar.kernels import chunked_attention as chunked_lib, flash_attention as flash_lib

# "auto" picks the first implementation that supports the inputs on the current backend.
IMPLEMENTATIONS = ("auto", "xla", "pallas", "cudnn")
# Above this many logits per (batch, head) the xla implementation switches to the blockwise path:
# 2048 x 2048 float32 logits are 16 MiB per head, and the dense path keeps several such buffers.
DENSE_MAX_LOGITS = 2048 * 2048
AUTO_ORDER = {"gpu": ("cudnn", "pallas", "xla"), "tpu": ("pallas", "xla")}
SPLASH_BLOCK = 128  # the TPU splash kernel's default tile; sequence lengths must be multiples of it


class AttentionUnsupportedError(ValueError):
    """The requested implementation cannot compute this attention; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """What a call asks for: the facts an implementation's support check needs."""

    backend: str
    dtype: jnp.dtype
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    segment_ids: bool = False
    separate_kv_segment_ids: bool = False  # segment ids given as a (q, kv) pair
    positions: bool = False
    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    return_lse: bool = False


def unsupported(implementation: str, case: AttentionCase) -> list[str]:
    """Why `implementation` cannot compute `case` ([] when it can)."""
    reasons = []
    if implementation == "xla":
        return reasons
    if implementation == "pallas":
        if case.backend == "tpu":
            return _splash_unsupported(case)
        if case.dtype not in flash_lib.SUPPORTED_DTYPES:
            reasons.append(f"dtype {case.dtype} (the kernel takes float32, bfloat16, float16)")
        if case.head_dim > flash_lib.MAX_HEAD_DIM:
            reasons.append(f"head dim {case.head_dim} > {flash_lib.MAX_HEAD_DIM}")
        return reasons
    if implementation == "cudnn":
        if case.backend != "gpu":
            return [f"cuDNN attention needs an NVIDIA GPU; the default backend is {case.backend!r}"]
        if case.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            reasons.append(f"dtype {case.dtype} (cuDNN flash attention takes bfloat16 or float16)")
        if case.segment_ids:
            reasons.append("segment ids")
        if case.positions:
            reasons.append("positions")
        if case.softcap is not None:
            reasons.append("softcap")
        if case.return_lse:
            reasons.append("return_lse (jax's cuDNN lse residual carries no gradient)")
        if case.window is not None and not case.causal:
            reasons.append("a window without causal masking")
        if case.causal and case.q_len != case.kv_len:
            reasons.append(f"causal masking with q length {case.q_len} != kv length {case.kv_len}")
        if case.head_dim % 8 or case.head_dim > 256:
            reasons.append(f"head dim {case.head_dim} (a multiple of 8, at most 256)")
        return reasons
    raise ValueError(
        f"attention implementation {implementation!r} is unknown; choose one of {list(IMPLEMENTATIONS)}"
    )


def _splash_unsupported(case: AttentionCase) -> list[str]:
    reasons = []
    if case.dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        reasons.append(f"dtype {case.dtype} (splash takes float32 or bfloat16)")
    if case.positions:
        reasons.append("positions (splash masks are static in the token index)")
    if case.return_lse:
        reasons.append("return_lse")
    if case.separate_kv_segment_ids:
        reasons.append("separate q/kv segment ids (rows with no visible key are undefined in splash)")
    if case.window is not None and case.q_len != case.kv_len:
        reasons.append("a window with q length != kv length (rows could see no key: undefined in splash)")
    if case.q_len % SPLASH_BLOCK or case.kv_len % SPLASH_BLOCK:
        reasons.append(
            f"sequence lengths {case.q_len}, {case.kv_len} that are not multiples of {SPLASH_BLOCK}"
        )
    return reasons


def resolve_implementation(implementation: str | None, case: AttentionCase) -> str:
    """The implementation that will run `case`, or AttentionUnsupportedError."""
    name = "auto" if implementation is None else implementation
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {name!r} is unknown; choose one of {list(IMPLEMENTATIONS)}"
        )
    if name == "auto":
        for candidate in AUTO_ORDER.get(case.backend, ("xla",)):
            if not unsupported(candidate, case):
                return candidate
        return "xla"
    reasons = unsupported(name, case)
    if reasons:
        raise AttentionUnsupportedError(
            f"attention implementation {name!r} cannot compute this call; unsupported: {'; '.join(reasons)}. "
            "Use implementation='xla' (runs everywhere) or 'auto' (picks one that can)."
        )
    return name


def _pair(value, q_len: int, kv_len: int, name: str):
    """`value` as a (q, kv) pair: one array serves both sides when Tq == Tk."""
    if value is None:
        return None, None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one [B, T] array or a (q [B, Tq], kv [B, Tk]) pair")
        return tuple(value)
    if q_len != kv_len:
        raise ValueError(
            f"one {name} array needs q length == kv length (got {q_len} and {kv_len}); "
            f"pass a (q_{name}, kv_{name}) pair"
        )
    return value, value


def case_of(
    q_BTNH,
    k_BSKH,
    *,
    segment_ids=None,
    positions=None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> AttentionCase:
    """The AttentionCase of a call to `attention` with these arguments, on the default backend."""
    _, Tq, N, H = q_BTNH.shape
    return AttentionCase(
        backend=jax.default_backend(),
        dtype=jnp.dtype(q_BTNH.dtype),
        q_len=Tq,
        kv_len=k_BSKH.shape[1],
        heads=N,
        kv_heads=k_BSKH.shape[2],
        head_dim=H,
        segment_ids=segment_ids is not None,
        separate_kv_segment_ids=isinstance(segment_ids, (tuple, list)),
        positions=positions is not None,
        causal=causal,
        window=window,
        softcap=softcap,
        return_lse=return_lse,
    )


def attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    *,
    segment_ids=None,
    positions=None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    return_lse: bool = False,
    block_sizes: flash_lib.BlockSizes | None = None,
    xla_chunk_size: int | None = None,
    interpret: bool | None = None,
):
    """Grouped-query attention: q [B, Tq, N, H], k and v [B, Tk, K, H] with K dividing N.

    segment_ids, positions: one [B, T] array (self-attention) or a (q [B, Tq], kv [B, Tk]) pair.
      Positions default to 0..T-1 on both sides; causal means q_pos >= kv_pos.
    window: keys with q_pos - kv_pos < window (and kv_pos - q_pos < window when not causal).
    softcap: logits -> softcap * tanh(logits / softcap).
    scale: logit scale, default head_dim ** -0.5.
    implementation: "auto"/None, "xla", "pallas", "cudnn" (see the module docstring).
    return_lse: also return the log-sum-exp [B, Tq, N] (float32, natural log; -inf for a query that
      sees no key), differentiable.
    block_sizes, interpret: passed to the Pallas kernel. xla_chunk_size: force the blockwise xla path.
    """
    Tq, Tk = q_BTNH.shape[1], k_BSKH.shape[1]
    q_seg, kv_seg = _pair(segment_ids, Tq, Tk, "segment_ids")
    q_pos, kv_pos = _pair(positions, Tq, Tk, "positions")
    flash_lib.check_inputs(q_BTNH, k_BSKH, v_BSKH, q_seg, kv_seg, q_pos, kv_pos, window, softcap)
    name = resolve_implementation(
        implementation,
        case_of(
            q_BTNH,
            k_BSKH,
            segment_ids=segment_ids,
            positions=positions,
            causal=causal,
            window=window,
            softcap=softcap,
            return_lse=return_lse,
        ),
    )
    mask = dict(causal=causal, window=window, softcap=softcap, scale=scale)

    if name == "xla":
        if xla_chunk_size is None and Tq * Tk <= DENSE_MAX_LOGITS:
            out, lse = flash_lib.reference_attention(
                q_BTNH,
                k_BSKH,
                v_BSKH,
                q_segment_ids_BT=q_seg,
                kv_segment_ids_BS=kv_seg,
                q_positions_BT=q_pos,
                kv_positions_BS=kv_pos,
                **mask,
            )
        else:
            out, lse = chunked_lib.chunked_attention(
                q_BTNH,
                k_BSKH,
                v_BSKH,
                q_segment_ids_BT=q_seg,
                kv_segment_ids_BS=kv_seg,
                q_positions_BT=q_pos,
                kv_positions_BS=kv_pos,
                chunk_size=xla_chunk_size or chunked_lib.DEFAULT_CHUNK,
                **mask,
            )
    elif name == "pallas" and jax.default_backend() == "tpu":
        out = splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids=q_seg, interpret=bool(interpret), **mask)
        lse = None  # return_lse is refused for splash
    elif name == "pallas":
        out, lse = flash_lib.flash_attention(
            q_BTNH,
            k_BSKH,
            v_BSKH,
            q_segment_ids_BT=q_seg,
            kv_segment_ids_BS=kv_seg,
            q_positions_BT=q_pos,
            kv_positions_BS=kv_pos,
            block_sizes=block_sizes,
            interpret=interpret,
            **mask,
        )
    else:  # cudnn; return_lse is refused
        out, lse = (
            jax.nn.dot_product_attention(
                q_BTNH,
                k_BSKH,
                v_BSKH,
                scale=scale,
                is_causal=causal,
                local_window_size=None if window is None else (window - 1, 0),
                implementation="cudnn",
            ),
            None,
        )
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------------
# TPU: the splash-attention kernel shipped with jax (pallas.ops.tpu.splash_attention).


def splash_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    *,
    segment_ids=None,
    causal=True,
    window=None,
    softcap=None,
    scale=None,
    interpret: bool = False,
):
    """Self-attention through jax's TPU splash kernel (one MQA kernel per kv head, vmapped over batch and
    kv heads). Only what _splash_unsupported allows reaches here. `interpret=True` runs it on CPU."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    if window is not None:
        # LocalMask's (left, right) are inclusive distances; right 0 makes it causal already.
        base = splash.LocalMask((T, S), (window - 1, 0 if causal else window - 1), offset=0)
    elif causal:
        base = splash.CausalMask((T, S))
    else:
        base = splash.FullMask((T, S))
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([base] * G), attn_logits_soft_cap=softcap, interpret=interpret
    )
    scale = H**-0.5 if scale is None else scale
    # Splash does not scale logits; scaling q first gives softcap * tanh(scale * q.k / softcap) as ours.
    q_BKGTH = (q_BTNH * jnp.asarray(scale, q_BTNH.dtype)).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    if segment_ids is None:
        per_kv_head = jax.vmap(lambda q, k, v: kernel(q, k, v))
        out = jax.vmap(per_kv_head)(q_BKGTH, k_BKSH, v_BKSH)
    else:
        segs = splash.SegmentIds(q=segment_ids.astype(jnp.int32), kv=segment_ids.astype(jnp.int32))
        per_kv_head = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s), in_axes=(0, 0, 0, None))
        out = jax.vmap(per_kv_head)(q_BKGTH, k_BKSH, v_BKSH, segs)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)
