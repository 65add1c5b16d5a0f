"""Attention implementations side by side (the work behind experiments/bench_attention.py): speed (GPU)
and error against a float64 reference (every backend) for each implementation, and the report
(results.json, README.md, attention.png).

On a GPU: forward and forward+backward TFLOP/s of every available implementation for the given sequence
lengths and head dims, causal and not, plus the error against float64 on a small slice. Elsewhere (CPU): no
timing (the Pallas kernel runs in interpret mode, which says nothing about speed), only the errors.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar import machine
from jaxpar.bench import common
from jaxpar.kernels import attention as attn_lib, flash_attention as fa

# Benchmark labels -> attention() keyword arguments. "xla" is what implementation="xla" dispatches to
# (dense up to attn_lib.DENSE_MAX_LOGITS, blockwise above); "xla_blockwise" forces the blockwise path.
IMPLEMENTATIONS = {
    "xla": dict(implementation="xla"),
    "xla_blockwise": dict(implementation="xla", xla_chunk_size=512),
    "pallas": dict(implementation="pallas"),
    "cudnn": dict(implementation="cudnn"),
}


@dataclasses.dataclass(frozen=True)
class BenchCase:
    seq_len: int
    head_dim: int
    causal: bool
    batch: int
    heads: int
    kv_heads: int
    dtype: str

    @property
    def label(self) -> str:
        return (
            f"T={self.seq_len} H={self.head_dim} {'causal' if self.causal else 'full'} "
            f"B={self.batch} N={self.heads} K={self.kv_heads} {self.dtype}"
        )


def unsupported(label: str, case: BenchCase) -> list[str]:
    impl = IMPLEMENTATIONS[label]["implementation"]
    return attn_lib.unsupported(
        impl,
        attn_lib.AttentionCase(
            backend=jax.default_backend(),
            dtype=jnp.dtype(case.dtype),
            q_len=case.seq_len,
            kv_len=case.seq_len,
            heads=case.heads,
            kv_heads=case.kv_heads,
            head_dim=case.head_dim,
            causal=case.causal,
        ),
    )


def make_inputs(case: BenchCase, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    T, B, N, K, H = case.seq_len, case.batch, case.heads, case.kv_heads, case.head_dim
    q = jax.random.normal(keys[0], (B, T, N, H), case.dtype)
    k = jax.random.normal(keys[1], (B, T, K, H), case.dtype)
    v = jax.random.normal(keys[2], (B, T, K, H), case.dtype)
    do = jax.random.normal(keys[3], (B, T, N, H), case.dtype)
    return q, k, v, do


def _functions(label: str, case: BenchCase):
    kwargs = dict(IMPLEMENTATIONS[label], causal=case.causal)

    def forward(q, k, v):
        return attn_lib.attention(q, k, v, **kwargs)

    def forward_backward(q, k, v, do):
        out, vjp = jax.vjp(forward, q, k, v)
        return out, vjp(do)

    return jax.jit(forward), jax.jit(forward_backward)


def _median_seconds(fn, *args, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_speed(label: str, case: BenchCase, warmup: int = 3, iters: int = 10) -> dict:
    q, k, v, do = make_inputs(case)
    forward, forward_backward = _functions(label, case)
    fwd_s = _median_seconds(forward, q, k, v, warmup=warmup, iters=iters)
    fwdbwd_s = _median_seconds(forward_backward, q, k, v, do, warmup=warmup, iters=iters)
    flops = dict(
        batch=case.batch,
        q_len=case.seq_len,
        kv_len=case.seq_len,
        heads=case.heads,
        head_dim=case.head_dim,
        causal=case.causal,
    )
    return {
        "fwd_ms": fwd_s * 1e3,
        "fwd_tflops": fa.flops(**flops, backward=False) / fwd_s / 1e12,
        "fwdbwd_ms": fwdbwd_s * 1e3,
        "fwdbwd_tflops": fa.flops(**flops, backward=True) / fwdbwd_s / 1e12,
    }


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


_REFERENCE_CACHE: dict = {}


def _reference(case: BenchCase):
    if case not in _REFERENCE_CACHE:
        q, k, v, do = make_inputs(case)
        with jax.enable_x64(True):
            f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, do)]

            def forward_backward(q, k, v, do):
                def attend(q, k, v):
                    return fa.reference_attention(q, k, v, causal=case.causal)[0]

                out, vjp = jax.vjp(attend, q, k, v)
                return out, vjp(do)

            _REFERENCE_CACHE.clear()  # one reference at a time: they are large
            _REFERENCE_CACHE[case] = jax.tree.map(np.asarray, jax.jit(forward_backward)(*f64))
    return _REFERENCE_CACHE[case]


def measure_error(label: str, case: BenchCase) -> dict:
    """Relative max-abs error (max |got - want| / max |want|) of out, dq, dk, dv against float64."""
    q, k, v, do = make_inputs(case)
    _, forward_backward = _functions(label, case)
    out, grads = forward_backward(q, k, v, do)
    want_out, want_grads = _reference(case)
    errors = {"out_err": _rel_err(out, want_out)}
    errors.update(
        {f"{name}_err": _rel_err(g, w) for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads)}
    )
    return errors


def _record(label, case, **fields):
    return {
        "impl": label,
        "seq_len": case.seq_len,
        "head_dim": case.head_dim,
        "causal": case.causal,
        "batch": case.batch,
        "heads": case.heads,
        "kv_heads": case.kv_heads,
        "dtype": case.dtype,
        **fields,
    }


def _measure_case(label, case, measure):
    reasons = unsupported(label, case)
    if reasons:
        return _record(label, case, unsupported="; ".join(reasons))
    try:
        return _record(label, case, **measure(label, case))
    except Exception as error:  # a failure is a result: record it and go on with the other cases
        traceback.print_exc()
        return _record(label, case, error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")


def speed_records(
    implementations: list[str],
    seq_lens: list[int],
    head_dims: list[int],
    dtypes: list[str],
    tokens: int,
    d_model: int,
    gqa: int,
    iters: int,
    error_max_seq: int,
) -> list[dict]:
    """GPU: TFLOP/s of each implementation at batch = `tokens` / T and heads = `d_model` / head dim, and its
    errors at B=1 with 2 kv heads for T <= `error_max_seq`."""
    measure_speed_iters = functools.partial(measure_speed, iters=iters)
    records = []
    for dtype, T in ((d, t) for d in dtypes for t in seq_lens):
        for H in head_dims:
            for causal in (False, True):
                heads = d_model // H
                case = BenchCase(T, H, causal, max(1, tokens // T), heads, heads // gqa, dtype)
                small = BenchCase(T, H, causal, 1, 2 * gqa, 2, dtype)
                for label in implementations:
                    record = _measure_case(label, case, measure_speed_iters)
                    if T <= error_max_seq and "unsupported" not in record:
                        errors = _measure_case(label, small, measure_error)
                        record.update(
                            {
                                key: value
                                for key, value in errors.items()
                                if key.endswith("_err") or key == "error"
                            }
                        )
                    print(record, flush=True)
                    records.append(record)
    return records


def error_records(
    implementations: list[str],
    seq_lens: list[int],
    head_dims: list[int],
    dtypes: list[str],
    batch: int,
    heads: int,
    gqa: int,
) -> list[dict]:
    """Any backend: each implementation's errors against float64."""
    records = []
    for dtype, T in ((d, t) for d in dtypes for t in seq_lens):
        for H in head_dims:
            for causal in (False, True):
                case = BenchCase(T, H, causal, batch, heads, heads // gqa, dtype)
                for label in implementations:
                    record = _measure_case(label, case, measure_error)
                    print(record, flush=True)
                    records.append(record)
    return records


# --------------------------------------------------------------------------------------------------
# Report.


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    m, records = results["machine"], results["records"]
    labels = [label for label in IMPLEMENTATIONS if any(r["impl"] == label for r in records)]
    lines = [
        f"# Attention benchmark ({m['backend']})",
        "",
        f"Machine: {m['device_kind']} ({m['devices']} device(s)); host CPU {m['cpu']}, "
        f"{m['cores']} cores. jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}, "
        f"Python {m['python']}. Date {m['date']}.",
        "",
    ]
    lines += results.get("notes", [])
    cases = sorted({(r["dtype"], r["seq_len"], r["head_dim"], r["causal"]) for r in records})
    by_key = {(r["dtype"], r["seq_len"], r["head_dim"], r["causal"], r["impl"]): r for r in records}
    lines += ["", results.get("shapes", ""), ""]
    if results["mode"] == "speed":
        lines += [
            "TFLOP/s (FlashAttention FLOP convention: 4*B*N*T^2*H forward, halved when causal; "
            "forward+backward = 3.5x forward). `-`: unsupported or failed (see results.json).",
            "",
        ]
        columns = " | ".join(f"{label} fwd | {label} fwd+bwd" for label in labels)
        header = f"| dtype | T | H | causal | {columns} |"
        lines += [header, "|" + "---|" * (4 + 2 * len(labels))]
        for dtype, seq, hd, causal in cases:
            cells = []
            for label in labels:
                r = by_key.get((dtype, seq, hd, causal, label), {})
                cells += [_fmt(r.get("fwd_tflops"), ".1f"), _fmt(r.get("fwdbwd_tflops"), ".1f")]
            lines.append(f"| {dtype} | {seq} | {hd} | {causal} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Max relative error (max |x - ref| / max |ref|) against a float64 reference, worst of "
        "out / dq / dk / dv (per-output errors in results.json). `n/a`: implementation "
        "unavailable.",
        "",
    ]
    lines += ["| dtype | T | H | causal | " + " | ".join(labels) + " |", "|" + "---|" * (4 + len(labels))]
    for dtype, seq, hd, causal in cases:
        cells = []
        for label in labels:
            r = by_key.get((dtype, seq, hd, causal, label), {})
            errs = [r.get(k) for k in ("out_err", "dq_err", "dk_err", "dv_err") if r.get(k) is not None]
            cells.append(f"{max(errs):.1e}" if errs else ("n/a" if r.get("unsupported") else "-"))
        lines.append(f"| {dtype} | {seq} | {hd} | {causal} | " + " | ".join(cells) + " |")
    unavailable = sorted({(r["impl"], r["unsupported"]) for r in records if r.get("unsupported")})
    if unavailable:
        lines += ["", "Unavailable here:"] + [f"- {impl}: {why}" for impl, why in unavailable]
    failed = [r for r in records if r.get("error")]
    if failed:
        lines += ["", "Failed:"] + [
            f"- {r['impl']} T={r['seq_len']} H={r['head_dim']} causal={r['causal']}: {r['error']}"
            for r in failed
        ]
    return "\n".join(lines) + "\n"


def _plot_line(ax, mode, rs, name):
    if mode == "speed":
        for key, style, what in (("fwd_tflops", "-o", "fwd"), ("fwdbwd_tflops", "--s", "fwd+bwd")):
            pts = [(r["seq_len"], r[key]) for r in rs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{name} {what}")
    else:
        pts = [
            (r["seq_len"], max(r[k] for k in ("out_err", "dq_err", "dk_err", "dv_err")))
            for r in rs
            if r.get("out_err") is not None
        ]
        if pts:
            ax.plot(*zip(*pts), "-o", label=name)


def plot(results: dict, path: pathlib.Path) -> None:
    m, records = results["machine"], results["records"]
    labels = [label for label in IMPLEMENTATIONS if any(r["impl"] == label for r in records)]
    head_dims = sorted({r["head_dim"] for r in records})
    fig, axes = common.pyplot().subplots(len(head_dims), 2, figsize=(11, 3.6 * len(head_dims)), squeeze=False)
    for row, hd in enumerate(head_dims):
        for col, causal in enumerate((False, True)):
            ax = axes[row][col]
            for label in labels:
                for dtype in sorted({r["dtype"] for r in records}):
                    rs = sorted(
                        (
                            r
                            for r in records
                            if r["impl"] == label
                            and r["head_dim"] == hd
                            and r["causal"] == causal
                            and r["dtype"] == dtype
                        ),
                        key=lambda r: r["seq_len"],
                    )
                    _plot_line(ax, results["mode"], rs, f"{label} {dtype}")
            ax.set_ylabel("TFLOP/s" if results["mode"] == "speed" else "max rel. error vs float64")
            if results["mode"] != "speed":
                ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_title(f"head dim {hd}, {'causal' if causal else 'non-causal'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    what = "speed" if results["mode"] == "speed" else "correctness only (no GPU; Pallas in interpret mode)"
    fig.suptitle(f"Attention {what}: {m['device_kind']}, jax {m['jax']}, {m['date']}", fontsize=10)
    common.save_figure(fig, path, dpi=110)


def write(results: dict, out: str) -> None:
    common.write_results(out, results)
    write_report(results, out)


def write_report(results: dict, out: str) -> None:
    """README.md and attention.png."""
    common.write_readme(out, markdown(results))
    plot(results, pathlib.Path(out) / "attention.png")


def run(
    out: str,
    implementations: list[str],
    head_dims: list[int],
    gqa: int,
    dtypes: list[str] | None,
    seq_lens: list[int],
    tokens: int,
    d_model: int,
    iters: int,
    error_max_seq: int,
    cpu_seq_lens: list[int],
    cpu_batch: int,
    cpu_heads: int,
) -> None:
    """Speed and errors on a GPU (`seq_lens`, `tokens`, `d_model`, `iters`, `error_max_seq`), errors only
    elsewhere (`cpu_*`); results.json, README.md and attention.png into `out`."""
    if jax.default_backend() == "gpu":
        mode = "speed"
        records = speed_records(
            implementations,
            seq_lens,
            head_dims,
            dtypes or ["bfloat16"],
            tokens,
            d_model,
            gqa,
            iters,
            error_max_seq,
        )
        notes = [
            "Block sizes are the kernel defaults (unmeasured when written; see "
            "jaxpar/kernels/flash_attention.py BlockSizes)."
        ]
        shapes = (
            f"Shapes: batch = {tokens} tokens / T, heads = {d_model} / head dim, "
            f"{gqa} query head(s) per kv head; self-attention. Errors: B=1, "
            f"{2 * gqa} heads, T <= {error_max_seq}."
        )
    else:
        mode = "correctness"
        notes = [
            "**No GPU was available for this run: there are no timings (GPU TFLOP/s: not measured).** "
            "On this backend the Pallas kernel runs in interpret mode (the same kernel code at its default "
            "BlockSizes, executed by XLA), so only correctness is reported; cuDNN needs an NVIDIA GPU. Run "
            "this script on a GPU for TFLOP/s (the defaults then cover T = 1k..16k, head dims 64 and 128, "
            "causal and not, 16k tokens per batch).",
        ]
        records = error_records(
            implementations,
            cpu_seq_lens,
            head_dims,
            dtypes or ["bfloat16", "float32"],
            cpu_batch,
            cpu_heads,
            gqa,
        )
        shapes = f"Shapes: B={cpu_batch}, N={cpu_heads}, K={cpu_heads // gqa}; self-attention (Tq = Tk = T)."
    results = {
        "mode": mode,
        "machine": machine.describe(),
        "notes": notes,
        "shapes": shapes,
        "records": records,
    }
    write(results, out)
    print(f"wrote {out}/results.json, README.md, attention.png")


def render(out: str) -> None:
    """README.md and attention.png again from `out`/results.json; nothing measured."""
    write_report(common.read_results(out), out)
