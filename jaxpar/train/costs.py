"""FLOP and byte math of jaxpar's models: the FLOP count behind MFU, and the analytic communication every
measured collective count (jaxpar.parallel.analysis) is checked against.

Byte convention: that of jaxpar.parallel.analysis (per device per step; all-gather: result bytes;
reduce-scatter, all-reduce, all-to-all, collective-permute: operand bytes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from jaxpar.config import ModelConfig
from jaxpar.parallel import analysis, pipeline

# Dense bf16 peak FLOP/s per chip by `device_kind` substring (vendor data sheets). CPU: none, MFU is null.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 * N (forward + backward matmuls) with N the parameters that take part in matmuls (everything but
    the input embedding lookup and norms; the output projection counts even when tied; of a MoE layer
    only what a token activates: top_k routed experts, the shared experts and the router), plus attention
    scores and values: 12 * layers * heads * head_dim * seq_len, halved because causal masking skips
    half of the score matrix. A linear-attention layer sees half a chunk within its chunk, and a
    head_dim x head_dim state (read and written once per token) instead of the rest of the sequence."""
    D, L = cfg.d_model, cfg.n_layers
    moe = cfg.moe
    # an MoE layer: each token passes its top_k routed experts, the shared ones (and their gate), the router
    moe_mlp = 3 * D * moe.d_ff * (moe.top_k + moe.shared_experts) + D * (moe.experts + moe.shared_gate)
    moe_layers = moe.moe_layers(L)
    mlp = moe_layers * moe_mlp + (L - moe_layers) * 3 * D * cfg.d_ff
    matmul_params = L * D * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + mlp
    matmul_params += D * cfg.vocab_size
    linear_keys = 0.5 * min(cfg.linear_chunk, seq_len) + cfg.head_dim
    keys_per_token = (L - cfg.linear_layers) * 0.5 * seq_len + cfg.linear_layers * linear_keys
    attention = 12 * cfg.n_heads * cfg.head_dim * keys_per_token
    return 6 * matmul_params + attention


@dataclasses.dataclass(frozen=True)
class Term:
    """One named communication of the analytic model: what moves, as which collective, how many bytes
    per device per step (module convention)."""

    name: str
    kind: str
    bytes: int


def expected_terms(
    model: ModelConfig,
    mesh_sizes: Mapping[str, int],
    global_batch: int,
    seq_len: int,
    *,
    param_bytes: int | None = None,
    act_bytes: int | None = None,
    reduce_scatter_as_all_reduce: bool = False,
) -> list[Term]:
    """The communications one train step of jaxpar's Llama needs on a data x fsdp x tensor mesh.

    Textbook terms (ZeRO-3 FSDP, data-parallel gradient all-reduce, Megatron tensor parallelism with
    sequence parallelism, vocab-parallel loss), each with the choice XLA's SPMD partitioner makes for
    this model where the textbook leaves one open, as read off the compiled HLO:

    - FSDP gathers each layer's weights twice: in the forward scan, and again in the backward scan
      (its residuals are the sharded parameter slices, not the gathered weights). Rematerialization
      adds no gather: the recomputed forward shares the backward's. The unembedding, outside the
      scan, is gathered once for both passes (with bf16 compute XLA gathers it twice: a known gap).
      Tied embeddings change nothing: the lookup and the unembedding communicate the table each.
    - Megatron-SP: per layer, all-gather the sequence shards into attention and into the MLP and
      reduce-scatter their outputs back (forward); the transposes of those in the backward. The input
      gradient is reduced once per column-parallel matmul (wq, wk, wv, w_gate, w_up: 5 per layer, not
      the 2 of a fused-QKV Megatron): GSPMD reduces each matmul's partial sum before they are added.
      With the gathered inputs saved (remat "none") the backward does not re-gather them; "save_dots"
      re-gathers them, "full" repeats all forward collectives.
    - The embedding lookup gathers the (fsdp/tensor-sharded) table, one mesh axis at a time, instead
      of Megatron's masked lookup + reduce-scatter of activations (cheaper whenever V*D*param bytes <
      B_local*T*D*act bytes). Its gradient is a full-size scatter-add on every device, all-reduced
      over the tensor axis, then over data x fsdp; XLA slices it to the shard only at the end.
      (Under FSDP alone XLA may instead gather the token ids and all-to-all the looked-up
      activations, forward and backward: a different route of about the same bytes.)
    - Norm scales are replicated, so their gradients are all-reduced over every axis that splits
      tokens, in the same two stages (tensor; data x fsdp).

    Weights and their gradients move in the parameter dtype, activations in the compute dtype, unless
    `param_bytes` / `act_bytes` say otherwise (the CPU backend has no bf16 arithmetic: float
    normalization upcasts bf16 values to f32, so there every collective moves 4-byte elements).
    Assumes one microbatch per step and untouched logical rules (jaxpar.parallel.rules.RULES).
    `reduce_scatter_as_all_reduce`: label reduce-scatters as all-reduces, as the CPU backend compiles
    them (GSPMD emits all-reduce + dynamic-slice; only GPU/TPU pipelines rewrite that pattern into a
    reduce-scatter). The bytes are the same under the module convention.
    """
    for axis, size in mesh_sizes.items():
        if axis not in ("data", "fsdp", "tensor") and size > 1:
            raise ValueError(
                f"mesh axis {axis}={size}: the analytic model covers data, fsdp and tensor only."
            )
    d, f, t = (mesh_sizes.get(axis, 1) for axis in ("data", "fsdp", "tensor"))
    p = param_bytes or np.dtype(model.param_dtype).itemsize
    a = act_bytes or np.dtype(model.dtype).itemsize
    L, D, V, T = model.n_layers, model.d_model, model.vocab_size, seq_len
    layer_weights = p * (D * model.head_dim * (2 * model.n_heads + 2 * model.n_kv_heads) + 3 * D * model.d_ff)
    table = unembed = p * V * D  # tied or not, the table is used (and communicated) twice
    norms = p * D * (2 * L + 1)
    tokens_local = global_batch // (d * f) * T
    act = tokens_local * D * a
    token_stages = (t > 1) + (d * f > 1)  # reductions over sequence shards, then over batch shards
    rs = "all-reduce" if reduce_scatter_as_all_reduce else "reduce-scatter"
    ag, ar = "all-gather", "all-reduce"

    terms = []
    if f > 1:
        terms += [
            Term("fsdp: all-gather layer weights (forward scan)", ag, L * layer_weights // t),
            Term("fsdp: all-gather layer weights again (backward scan)", ag, L * layer_weights // t),
            Term("fsdp: all-gather unembedding (once, both passes)", ag, unembed // t),
            Term(
                "fsdp: reduce-scatter layer and unembedding gradients", rs, (L * layer_weights + unembed) // t
            ),
        ]
    if d > 1:
        terms.append(
            Term(
                "data: all-reduce layer and unembedding gradient shards",
                ar,
                (L * layer_weights + unembed) // (f * t),
            )
        )
    if t > 1:
        remat = remat_family(model.remat)
        remat_gathers = {"none": 0, "save_dots": 2, "full": 2}[remat]
        remat_scatters = {"none": 0, "save_dots": 0, "full": 1}[remat]
        terms += [
            Term("tensor: all-gather sequence shards into attention and MLP (forward)", ag, 2 * L * act),
            Term(
                "tensor: reduce-scatter attention and MLP outputs to sequence shards (forward)",
                rs,
                2 * L * act,
            ),
            Term("tensor: all-gather output gradients (backward)", ag, 2 * L * act),
            Term(
                "tensor: reduce-scatter input gradients, one per column-parallel matmul (backward)",
                rs,
                5 * L * act,
            ),
            Term(
                f"tensor: all-gather sequence shards again (remat={model.remat})", ag, remat_gathers * L * act
            ),
            Term(f"tensor: reduce-scatter outputs again (remat={model.remat})", rs, remat_scatters * L * act),
            Term("tensor: all-gather final hidden states for the vocab-parallel unembedding", ag, act),
            Term("tensor: all-reduce the unembedding's input gradient", ar, act),
            Term(
                "tensor: all-reduce max, sum-exp and target logit over vocab shards (loss)",
                ar,
                3 * tokens_local * 4,
            ),
        ]
    if f * t > 1:
        terms.append(
            Term(
                "embedding: all-gather the table for the lookup, one axis at a time",
                ag,
                (table // t if f > 1 else 0) + (table if t > 1 else 0),
            )
        )
    terms += [
        Term(
            "embedding: all-reduce the full-size table gradient, per token-splitting stage",
            ar,
            table * token_stages,
        ),
        Term(
            "norms: all-reduce replicated norm-scale gradients, per token-splitting stage",
            ar,
            norms * token_stages,
        ),
    ]
    return [term for term in terms if term.bytes]


def expected_collective_bytes(
    model: ModelConfig, mesh_sizes: Mapping[str, int], global_batch: int, seq_len: int, **options
) -> dict[str, int]:
    """`expected_terms` (same options) summed by kind, plus "total" (the keys of `collective_bytes`)."""
    return analysis.totals_by_kind(
        (term.kind, term.bytes)
        for term in expected_terms(model, mesh_sizes, global_batch, seq_len, **options)
    )


def sequence_terms(
    variant: str,
    *,
    batch: int,
    seq_len: int,
    sequence: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    act_bytes: int = 4,
    segment_ids: bool = True,
    ulysses_degree: int = 1,
    zigzag: int = 1,
) -> list[tuple[str, str, int]]:
    """(what, collective kind, bytes) per device for one layer's forward + backward, in the convention of
    jaxpar.parallel.analysis (all-gather: result bytes; reduce-scatter, all-to-all, collective-permute:
    operand bytes). batch: rows per device; heads, kv_heads: per device after tensor parallelism.
    variant: one of jaxpar.parallel.sequence.VARIANTS, or "lasp2" (linear attention; `zigzag` > 1 gives
    two pieces per device).
    Ring and all-gather K/V gradients travel as float32; segment ids as int32."""
    n, t = sequence, seq_len // sequence
    kv = batch * t * kv_heads * head_dim * act_bytes  # this device's K (or V) shard
    kv32 = batch * t * kv_heads * head_dim * 4
    seg = batch * t * 4 if segment_ids else 0
    qo = batch * t * heads * head_dim * act_bytes
    if variant == "ring":
        return [
            ("forward: K, V passed n-1 times", "collective-permute", (n - 1) * 2 * kv),
            ("forward: kv segment ids passed n-1 times", "collective-permute", (n - 1) * seg),
            ("backward: K, V passed n-1 times again", "collective-permute", (n - 1) * 2 * kv),
            ("backward: kv segment ids again", "collective-permute", (n - 1) * seg),
            (
                "backward: dK, dV (float32) passed n times, home",
                "collective-permute",
                n * 2 * kv32 if n > 1 else 0,
            ),
        ]
    if variant == "ulysses":
        return [
            ("forward: all-to-all q, k, v, out", "all-to-all", 2 * qo + 2 * kv),
            ("backward: all-to-all d out, dq, dk, dv", "all-to-all", 2 * qo + 2 * kv),
            ("forward: all-gather segment ids", "all-gather", n * seg),
        ]
    if variant == "usp":
        u, r = ulysses_degree, n // ulysses_degree
        ring_kv = batch * (u * t) * (kv_heads // u) * head_dim  # a ring block: group's tokens, 1/u heads
        ring_seg = batch * u * t * 4 if segment_ids else 0
        return [
            ("forward: all-to-all q, k, v, out inside groups", "all-to-all", 2 * qo + 2 * kv),
            ("backward: all-to-all inside groups", "all-to-all", 2 * qo + 2 * kv),
            ("forward: all-gather segment ids inside groups", "all-gather", u * seg),
            (
                "ring across groups: K, V passed r-1 times, forward and backward",
                "collective-permute",
                (r - 1) * 4 * ring_kv * act_bytes,
            ),
            (
                "ring: segment ids passed r-1 times, forward and backward",
                "collective-permute",
                (r - 1) * 2 * ring_seg,
            ),
            (
                "ring: dK, dV (float32) passed r times",
                "collective-permute",
                r * 2 * ring_kv * 4 if r > 1 else 0,
            ),
        ]
    if variant == "allgather":
        return [
            ("forward: all-gather K, V", "all-gather", 2 * n * kv),
            ("forward: all-gather kv segment ids", "all-gather", n * seg),
            ("backward: reduce-scatter dK, dV (float32)", "reduce-scatter", 2 * n * kv32),
        ]
    if variant == "lasp2":
        pieces = 2 if zigzag > 1 else 1
        states = n * pieces * batch * kv_heads * (head_dim * head_dim + 1) * 4  # + summed log decays
        return [
            ("forward: all-gather memory states and decays", "all-gather", states),
            ("forward: all-gather segment tags", "all-gather", n * pieces * batch * 4),
            ("backward: reduce-scatter their gradients", "reduce-scatter", states),
        ]
    raise ValueError(f"unknown variant {variant!r}")


def activation_bytes(
    model_cfg: ModelConfig, microbatch_rows: int, seq_len: int, mesh_sizes: Mapping[str, int] | None = None
) -> int:
    """Bytes one device holds of one microbatch activation (what one ppermute moves per device): rows
    split over data*fsdp, the sequence over tensor (the residual stream is sequence-parallel)."""
    sizes = mesh_sizes or {}
    rows = microbatch_rows // (sizes.get("data", 1) * sizes.get("fsdp", 1))
    length = seq_len // (sizes.get("tensor", 1) * sizes.get("sequence", 1))
    return rows * length * model_cfg.d_model * np.dtype(model_cfg.dtype).itemsize


def expected_ppermute_bytes(program: pipeline.TickProgram, act_bytes: int) -> dict[str, int]:
    """Analytic ppermute bytes per device per step (module convention of jaxpar.parallel.analysis:
    operand bytes per execution): the executor moves one activation buffer forward in every tick in
    which some stage sends one, and one gradient buffer backward likewise. `useful` is the part that
    carries data, averaged over devices: each microbatch crosses G-1 stage boundaries each way."""
    sched = program.schedule
    G = sched.num_global_stages
    forward = int(program.fwd_comm.sum()) * act_bytes
    backward = int(program.bwd_comm.sum()) * act_bytes
    useful = 2 * sched.microbatches * (G - 1) * act_bytes / sched.num_stages
    return {"forward": forward, "backward": backward, "total": forward + backward, "useful": int(useful)}


def remat_family(remat: str) -> str:
    """The remat policy whose recomputation (FLOPs, re-gathered inputs) a config.model.remat value shares:
    'offload' recomputes what save_dots does; the names-based policies are counted as 'full' (an upper
    bound: the named activations they keep are not recomputed)."""
    return {"offload": "save_dots", "save_names": "full", "offload_names": "full"}.get(remat, remat)
