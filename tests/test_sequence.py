"""Sequence parallelism at the layer: every variant's attention (ring, Ulysses, USP, all-gather) and LASP-2
linear attention on 8 simulated devices equal the single-device computation, outputs and gradients
wrt every input (fp32), for sequence = 2, 4, 8 alone and with data / fsdp / tensor, on packed rows with
causal masks. Also: the zigzag layout, the ring's schedule (each visible block computed exactly once,
equal work per device) and what it really executes, and the errors for impossible splits.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.kernels.attention import attention
from jaxpar.models import linear_attention as la
from jaxpar.parallel import ring as ring_lib, sequence as seq
from jaxpar.parallel.mesh import make_mesh
from jaxpar.parallel.per_device import per_device
from lm_testing import packed_batch

B, T, N, K, H = 4, 32, 8, 4, 8
TOL = 2e-6  # max |got - want| / max |want|, fp32


def mesh_of(**sizes):
    return make_mesh(sizes, jax.devices()[: int(np.prod(list(sizes.values())))])


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    rows = packed_batch(seed, batch=B, length=T)
    log_decay = (jax.nn.log_sigmoid(normal(B, T, K) + 2.0) / 4.0).astype(np.float32)
    return dict(
        q=normal(B, T, N, H),
        k=normal(B, T, K, H),
        v=normal(B, T, K, H),
        g=np.asarray(log_decay),
        seg=rows["segment_ids"],
        pos=rows["positions"],
        ct=normal(B, T, N, H),
    )


def value_and_vjp(fn, args, ct):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(ct)


def assert_close(got, want, what):
    err = np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max()
    assert err < TOL, f"{what}: relative error {err:.2e}"


def check_parity(local_fn, reference_fn, names, mesh, zigzag, x):
    """local_fn on `mesh` with inputs in the zigzag(n) layout vs reference_fn on one device in token
    order: outputs and the gradients wrt `names`."""
    want_out, want_grads = jax.jit(lambda *a: value_and_vjp(reference_fn, a, x["ct"]))(*(x[n] for n in names))
    z = {key: seq.to_zigzag(value, zigzag) for key, value in x.items()}
    with jax.set_mesh(mesh):
        out, grads = jax.jit(lambda *a: value_and_vjp(lambda *b: local_fn(*b, z), a, z["ct"]))(
            *(z[n] for n in names)
        )
    assert_close(seq.from_zigzag(np.asarray(out), zigzag), want_out, "output")
    for name, got, want in zip(names, grads, want_grads):
        assert_close(seq.from_zigzag(np.asarray(got), zigzag), want, f"d{name}")


# --------------------------------------------------------------------------------------------------
# Softmax attention variants.

CASES = {
    "ring_seq8": ("ring", dict(sequence=8), {}),
    "ring_seq4_dp2": ("ring", dict(sequence=4, data=2), {}),
    "ring_seq2_fsdp2_tp2": ("ring", dict(sequence=2, fsdp=2, tensor=2), {}),
    "ring_contiguous_seq4_dp2": ("ring", dict(sequence=4, data=2), dict(layout="contiguous")),
    "ring_window_seq4_tp2": ("ring", dict(sequence=4, tensor=2), dict(window=5)),
    "ulysses_seq4_dp2": ("ulysses", dict(sequence=4, data=2), {}),
    "ulysses_seq2_tp2_dp2": ("ulysses", dict(sequence=2, tensor=2, data=2), {}),
    "usp_seq8_u2": ("usp", dict(sequence=8), dict(ulysses_degree=2)),
    "usp_seq4_tp2": ("usp", dict(sequence=4, tensor=2), {}),  # auto degree 2 (2 KV heads per shard)
    "allgather_seq8": ("allgather", dict(sequence=8), {}),
    "allgather_seq2_tp2_fsdp2": ("allgather", dict(sequence=2, tensor=2, fsdp=2), {}),
}


def layout_of(variant, sizes, options):
    n = sizes["sequence"]
    degree = 1
    if variant == "usp":
        tp = sizes.get("tensor", 1)
        degree = seq.resolve_ulysses_degree(options.get("ulysses_degree", 0), n, N // tp, K // tp)
    return seq.zigzag_factor(variant, n, degree, layout=options.get("layout", "zigzag"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_matches_single_device(name):
    variant, sizes, options = CASES[name]
    x = inputs()
    mask = {key: options[key] for key in ("window",) if key in options}

    def reference(q, k, v):
        return attention(q, k, v, segment_ids=x["seg"], implementation="xla", **mask)

    def parallel(q, k, v, z):
        return seq.sequence_attention(
            q, k, v, segment_ids=z["seg"], variant=variant, implementation="xla", **options
        )

    check_parity(parallel, reference, "qkv", mesh_of(**sizes), layout_of(variant, sizes, options), x)


def test_ring_with_given_mask_positions():
    """Caller-given positions (here: each document's own positions) mask instead of the token index; the
    ring then rotates them with K/V and skips nothing."""
    x = inputs(1)

    def reference(q, k, v):
        return attention(q, k, v, segment_ids=x["seg"], positions=x["pos"], implementation="xla")

    def parallel(q, k, v, z):
        return seq.sequence_attention(
            q, k, v, segment_ids=z["seg"], positions=z["pos"], variant="ring", implementation="xla"
        )

    check_parity(parallel, reference, "qkv", mesh_of(sequence=4, data=2), 4, x)


def test_ring_log_sum_exp_and_its_gradient():
    """The ring's merged log-sum-exp equals the kernel's, and gradients flow through it too."""
    x = inputs(5)
    rng = np.random.default_rng(5)
    ct_lse = rng.normal(size=(B, T, N)).astype(np.float32)

    def loss_terms(out, lse, ct, ct_lse):
        return jnp.sum(out * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * ct_lse)

    def reference(q, k, v):
        out, lse = attention(q, k, v, segment_ids=x["seg"], implementation="xla", return_lse=True)
        return loss_terms(out, lse, x["ct"], ct_lse), (out, lse)

    names, rows = ("batch", "length", "heads", None), ("batch", "length")

    def parallel(q, k, v, seg, ct, ct_lse):
        def local(q, k, v, segment_ids):
            return ring_lib.ring_attention(
                q, k, v, axis_name="sequence", segment_ids=segment_ids, return_lse=True
            )

        out, lse = per_device(
            local,
            dict(q=q, k=k, v=v, segment_ids=seg),
            dict(q=names, k=names, v=names, segment_ids=rows),
            (names, ("batch", "length", "heads")),
            batch=B,
            heads=(N, K),
            length_axis="sequence",
        )
        return loss_terms(out, lse, ct, ct_lse), (out, lse)

    grad = functools.partial(jax.grad, argnums=(0, 1, 2), has_aux=True)
    want_grads, (want_out, want_lse) = jax.jit(grad(reference))(x["q"], x["k"], x["v"])
    z = lambda a: seq.to_zigzag(a, 4)
    with jax.set_mesh(mesh_of(sequence=4, data=2)):
        grads, (out, lse) = jax.jit(grad(parallel))(
            z(x["q"]), z(x["k"]), z(x["v"]), z(x["seg"]), z(x["ct"]), z(ct_lse)
        )
    assert_close(seq.from_zigzag(np.asarray(lse), 4), want_lse, "lse")
    assert_close(seq.from_zigzag(np.asarray(out), 4), want_out, "output")
    for name, got, want in zip("qkv", grads, want_grads):
        assert_close(seq.from_zigzag(np.asarray(got), 4), want, f"d{name}")


def test_ring_with_the_pallas_kernel():
    x = inputs(2)

    def reference(q, k, v):
        return attention(q, k, v, segment_ids=x["seg"], implementation="xla")

    def parallel(q, k, v, z):
        return seq.sequence_attention(q, k, v, segment_ids=z["seg"], variant="ring", implementation="pallas")

    check_parity(parallel, reference, "qkv", mesh_of(sequence=4, data=2), 4, x)


def test_no_mesh_or_one_shard_is_plain_attention():
    x = inputs()
    want = attention(x["q"], x["k"], x["v"], segment_ids=x["seg"], implementation="xla")
    got = seq.sequence_attention(x["q"], x["k"], x["v"], segment_ids=x["seg"], implementation="xla")
    np.testing.assert_array_equal(got, want)
    with jax.set_mesh(mesh_of(data=8)):  # a mesh whose sequence axis has size 1
        got = jax.jit(
            lambda q, k, v, seg: seq.sequence_attention(q, k, v, segment_ids=seg, implementation="xla")
        )(x["q"], x["k"], x["v"], x["seg"])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# LASP-2 linear attention.


@pytest.mark.parametrize("gated", [False, True])
def test_chunked_linear_attention_matches_definition(gated):
    x = inputs(3)
    g = x["g"] if gated else np.zeros_like(x["g"])
    want = la.reference_linear_attention(x["q"], x["k"], x["v"], g, x["seg"])
    for chunk, length in ((8, T), (5, T), (8, T - 3)):  # ragged chunks and lengths
        got = la.chunked_linear_attention(
            x["q"][:, :length],
            x["k"][:, :length],
            x["v"][:, :length],
            g[:, :length],
            x["seg"][:, :length],
            chunk=chunk,
        )
        assert_close(got, want[:, :length], f"chunk {chunk}, length {length}")


LASP_CASES = {
    "seq4_fsdp2_contiguous": (dict(sequence=4, fsdp=2), 1),
    "seq8_zigzag8": (dict(sequence=8), 8),
    "seq8_zigzag2_usp_layout": (dict(sequence=8), 2),
    "seq2_tp2_dp2_zigzag2": (dict(sequence=2, tensor=2, data=2), 2),
}


@pytest.mark.parametrize("name", sorted(LASP_CASES))
def test_lasp2_matches_single_device(name):
    sizes, zigzag = LASP_CASES[name]
    x = inputs(4)

    def reference(q, k, v, g):
        return la.reference_linear_attention(q, k, v, g, x["seg"])

    def parallel(q, k, v, g, z):
        return la.linear_attention(q, k, v, g, z["seg"], chunk=4, zigzag=zigzag)

    check_parity(parallel, reference, "qkvg", mesh_of(**sizes), zigzag, x)


def test_lasp2_gathers_states_once():
    """One all-gather of the memory states forward (its transpose, a reduce-scatter, backward); no
    ring of permutes."""
    from jaxpar.parallel import analysis

    x = inputs()
    with jax.set_mesh(mesh_of(sequence=8)):

        def loss(q, k, v, g):
            return jnp.sum(la.linear_attention(q, k, v, g, x["seg"], chunk=4) * x["ct"])

        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x["q"], x["k"], x["v"], x["g"])
        compiled = lowered.compile()
    kinds = collections.Counter(op.kind for op in analysis.collective_ops(compiled))
    assert kinds["collective-permute"] == 0 and kinds["all-to-all"] == 0, kinds
    state_gathers = [
        op
        for op in analysis.collective_ops(compiled)
        if op.kind == "all-gather" and op.bytes >= 8 * B * K * H * H * 4
    ]
    assert len(state_gathers) == 1, analysis.collective_ops(compiled)


# --------------------------------------------------------------------------------------------------
# Layout and schedule.


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_zigzag_layout_round_trips(n):
    rows = packed_batch(5, batch=3, length=48)
    zig = seq.zigzag_batch(rows, n)
    for key, value in rows.items():
        np.testing.assert_array_equal(seq.from_zigzag(zig[key], n), value)
        np.testing.assert_array_equal(np.asarray(seq.from_zigzag(jnp.asarray(zig[key]), n)), value)
    perm = ring_lib.zigzag_indices(48, n)
    assert sorted(perm.tolist()) == list(range(48))
    if n > 1:  # device r holds chunks r and 2n-1-r
        chunk = 48 // (2 * n)
        shards = perm.reshape(n, 2, chunk)[:, :, 0] // chunk
        np.testing.assert_array_equal(shards, [[r, 2 * n - 1 - r] for r in range(n)])


@pytest.mark.parametrize("zigzag", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_ring_schedule_computes_every_visible_block_once(n, zigzag):
    """Token-level bookkeeping of what the schedule computes, against the causal mask."""
    t = 2 * n * 2
    local = t // n
    perm = ring_lib.zigzag_indices(t, n if zigzag else 1).reshape(n, local)
    computed = np.zeros((t, t), int)
    table = ring_lib.schedule(n, zigzag, causal=True)
    for s in range(n):
        for r in range(n):
            src = (r - s) % n
            q_idx, kv_idx = perm[r], perm[src]
            mode = table[s, r]
            if mode == ring_lib.SKIP:
                continue
            if mode == ring_lib.KV_FIRST_HALF:
                kv_idx = kv_idx[: local // 2]
            if mode == ring_lib.Q_SECOND_HALF:
                q_idx = q_idx[local // 2 :]
            computed[np.ix_(q_idx, kv_idx)] += 1
    visible = np.tril(np.ones((t, t), int))
    assert computed.max() == 1
    np.testing.assert_array_equal(computed * visible, visible)  # nothing visible left out
    work = ring_lib.schedule_work(n, zigzag, causal=True)
    if zigzag:
        assert np.all(work == work[0]), work
    else:
        np.testing.assert_array_equal(work, np.arange(1, n + 1))


def test_ring_executes_the_schedule():
    """Measured with a counting block function: the query-key pairs each device's kernel calls cover
    (the device is recognised by the true position of the first query it passes)."""
    x = inputs()
    n, local = 4, T // 4
    counts = collections.defaultdict(float)

    def record(first_position, pairs, zigzag):
        chunk = int(first_position) // (local // 2 if zigzag else local)
        rank = chunk if chunk < n else 2 * n - 1 - chunk  # zigzag: device r holds chunks r and 2n-1-r
        counts[rank] += float(pairs)

    for zigzag in (True, False):
        counts.clear()

        def counting_block(q, k, v, qs, ks, qp, kp):
            pairs = q.shape[0] * q.shape[1] * k.shape[1]
            jax.debug.callback(lambda p, c: record(p, c, zigzag), qp[0, 0], pairs)
            return attention(
                q, k, v, segment_ids=(qs, ks), positions=(qp, kp), implementation="xla", return_lse=True
            )

        def local_fn(q, k, v, segment_ids, positions):
            return ring_lib.ring_attention(
                q, k, v, axis_name="sequence", segment_ids=segment_ids, zigzag=zigzag, block_fn=counting_block
            )

        # A mesh of the sequence axis alone: jax's debug callbacks fail in partial-manual shard_maps.
        only_sequence = jax.make_mesh(
            (n,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
        )
        with jax.set_mesh(only_sequence):
            out = per_device(
                local_fn,
                dict(q=x["q"], k=x["k"], v=x["v"], segment_ids=x["seg"], positions=None),
                dict(
                    q=("batch", "length", "heads", None),
                    k=("batch", "length", "heads", None),
                    v=("batch", "length", "heads", None),
                    segment_ids=("batch", "length"),
                    positions=None,
                ),
                ("batch", "length", "heads", None),
                batch=B,
                heads=(N, K),
                length_axis="sequence",
            )
            jax.block_until_ready(out)
        got = np.array([counts[r] for r in range(n)]) / (B * local * local)
        np.testing.assert_allclose(got, ring_lib.schedule_work(n, zigzag, causal=True))


# --------------------------------------------------------------------------------------------------
# Errors.


def trace(variant, sizes, t=T, kv_heads=K, **options):
    x = inputs()
    with jax.set_mesh(mesh_of(**sizes)):
        jax.eval_shape(
            lambda q, k, v: seq.sequence_attention(q, k, v, variant=variant, **options),
            x["q"][:, :t],
            x["k"][:, :t, :kv_heads],
            x["v"][:, :t, :kv_heads],
        )


def test_impossible_splits_fail_clearly():
    with pytest.raises(ValueError, match=r"key/value heads \(grouped-query attention\) do not divide by 8"):
        trace("ulysses", dict(sequence=8))
    with pytest.raises(ValueError, match="query heads do not divide by 4"):
        seq.check_split("ulysses", 4, T, 6, 2)
    with pytest.raises(ValueError, match="cuts the sequence into 16 equal chunks; sequence length 24"):
        trace("ring", dict(sequence=8), t=24)
    with pytest.raises(ValueError, match="cannot be split over 8 sequence shards"):
        trace("ulysses", dict(sequence=8), t=20, kv_heads=8)
    with pytest.raises(ValueError, match="ulysses_degree=3 must be a divisor"):
        trace("usp", dict(sequence=8), ulysses_degree=3)
    with pytest.raises(ValueError, match="sequence_parallel='tokenring' is not supported"):
        trace("tokenring", dict(sequence=2))
    with pytest.raises(ValueError, match="cannot be split into 16 equal pieces"):
        x = inputs()
        with jax.set_mesh(mesh_of(sequence=8)):
            jax.eval_shape(
                lambda q, k, v, g: la.linear_attention(q, k, v, g, zigzag=8),
                x["q"][:, :24],
                x["k"][:, :24],
                x["v"][:, :24],
                x["g"][:, :24],
            )
