"""Measurement pieces for experiments/bench_attention.py: speed (GPU) and error against a float64
reference (every backend) for each attention implementation, and the report (json, markdown, plot)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar import machine as machine_lib
from jaxpar.kernels import attention as attn_lib
from jaxpar.kernels import flash_attention as fa

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
        return (f"T={self.seq_len} H={self.head_dim} {'causal' if self.causal else 'full'} "
                f"B={self.batch} N={self.heads} K={self.kv_heads} {self.dtype}")


def unsupported(label: str, case: BenchCase) -> list[str]:
    impl = IMPLEMENTATIONS[label]["implementation"]
    return attn_lib.unsupported(impl, attn_lib.AttentionCase(
        backend=jax.default_backend(), dtype=jnp.dtype(case.dtype), q_len=case.seq_len, kv_len=case.seq_len,
        heads=case.heads, kv_heads=case.kv_heads, head_dim=case.head_dim, causal=case.causal))


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
    flops = dict(batch=case.batch, q_len=case.seq_len, kv_len=case.seq_len, heads=case.heads,
                 head_dim=case.head_dim, causal=case.causal)
    return {"fwd_ms": fwd_s * 1e3, "fwd_tflops": fa.flops(**flops, backward=False) / fwd_s / 1e12,
            "fwdbwd_ms": fwdbwd_s * 1e3, "fwdbwd_tflops": fa.flops(**flops, backward=True) / fwdbwd_s / 1e12}


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
    errors.update({f"{name}_err": _rel_err(g, w) for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads)})
    return errors


# --------------------------------------------------------------------------------------------------
# Report.


machine = machine_lib.describe  # what the results name as their machine


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    m, records = results["machine"], results["records"]
    labels = [label for label in IMPLEMENTATIONS if any(r["impl"] == label for r in records)]
    lines = [f"# Attention benchmark ({m['backend']})", "",
             f"Machine: {m['device_kind']} ({m['devices']} device(s)); host CPU {m['cpu']}, "
             f"{m['cores']} cores. jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}, "
             f"Python {m['python']}. Date {m['date']}.", ""]
    lines += results.get("notes", [])
    cases = sorted({(r["dtype"], r["seq_len"], r["head_dim"], r["causal"]) for r in records})
    by_key = {(r["dtype"], r["seq_len"], r["head_dim"], r["causal"], r["impl"]): r for r in records}
    lines += ["", results.get("shapes", ""), ""]
    if results["mode"] == "speed":
        lines += ["TFLOP/s (FlashAttention FLOP convention: 4*B*N*T^2*H forward, halved when causal; "
                  "forward+backward = 3.5x forward). `-`: unsupported or failed (see results.json).", ""]
        columns = " | ".join(f"{label} fwd | {label} fwd+bwd" for label in labels)
        header = f"| dtype | T | H | causal | {columns} |"
        lines += [header, "|" + "---|" * (4 + 2 * len(labels))]
        for dtype, seq, hd, causal in cases:
            cells = []
            for label in labels:
                r = by_key.get((dtype, seq, hd, causal, label), {})
                cells += [_fmt(r.get("fwd_tflops"), ".1f"), _fmt(r.get("fwdbwd_tflops"), ".1f")]
            lines.append(f"| {dtype} | {seq} | {hd} | {causal} | " + " | ".join(cells) + " |")
    lines += ["", "Max relative error (max |x - ref| / max |ref|) against a float64 reference, worst of "
              "out / dq / dk / dv (per-output errors in results.json). `n/a`: implementation unavailable.", ""]
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
        lines += ["", "Failed:"] + [f"- {r['impl']} T={r['seq_len']} H={r['head_dim']} causal={r['causal']}: "
                                    f"{r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def _plot_line(ax, mode, rs, name):
    if mode == "speed":
        for key, style, what in (("fwd_tflops", "-o", "fwd"), ("fwdbwd_tflops", "--s", "fwd+bwd")):
            pts = [(r["seq_len"], r[key]) for r in rs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{name} {what}")
    else:
        pts = [(r["seq_len"], max(r[k] for k in ("out_err", "dq_err", "dk_err", "dv_err")))
               for r in rs if r.get("out_err") is not None]
        if pts:
            ax.plot(*zip(*pts), "-o", label=name)


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, records = results["machine"], results["records"]
    labels = [label for label in IMPLEMENTATIONS if any(r["impl"] == label for r in records)]
    head_dims = sorted({r["head_dim"] for r in records})
    fig, axes = plt.subplots(len(head_dims), 2, figsize=(11, 3.6 * len(head_dims)), squeeze=False)
    for row, hd in enumerate(head_dims):
        for col, causal in enumerate((False, True)):
            ax = axes[row][col]
            for label in labels:
                for dtype in sorted({r["dtype"] for r in records}):
                    rs = sorted((r for r in records if r["impl"] == label and r["head_dim"] == hd
                                 and r["causal"] == causal and r["dtype"] == dtype), key=lambda r: r["seq_len"])
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: str) -> pathlib.Path:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "README.md").write_text(markdown(results))
    plot(results, out / "attention.png")
    return out
