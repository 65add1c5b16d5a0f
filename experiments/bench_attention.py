"""Attention implementations side by side, in one run.

  python experiments/bench_attention.py --out=benchmarks/attention

On a GPU: forward and forward+backward TFLOP/s of every available implementation (xla, xla_blockwise,
pallas, cudnn) for T in --seq_lens, head dims --head_dims, causal and not, with batch = --tokens / T and
heads = --d_model / head dim; plus the error against a float64 reference on a small slice.
Elsewhere (CPU): no timing (the Pallas kernel runs in interpret mode, which says nothing about speed),
only the error of each implementation against float64 for --cpu_seq_lens at --cpu_batch x --cpu_heads.
Writes results.json, README.md and attention.png into --out.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import json  # noqa: E402
import pathlib  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxpar.kernels import attention_bench as bench  # noqa: E402

_OUT = flags.DEFINE_string("out", "benchmarks/attention", "Directory for results.json, README.md and "
                           "attention.png.")
_IMPLS = flags.DEFINE_list("implementations", list(bench.IMPLEMENTATIONS), "Labels to run (unavailable ones "
                           "are recorded as such).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384"], "GPU sequence lengths.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dims.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "GPU: batch = tokens / T.")
_D_MODEL = flags.DEFINE_integer("d_model", 2048, "GPU: heads = d_model / head dim.")
_GQA = flags.DEFINE_integer("gqa", 1, "Query heads per kv head.")
_DTYPES = flags.DEFINE_list("dtypes", None, "Input dtypes (default: bfloat16 on GPU; bfloat16 and float32 "
                            "elsewhere).")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed iterations (median reported).")
_ERROR_MAX_SEQ = flags.DEFINE_integer("error_max_seq", 2048, "GPU: measure errors up to this T (B=1, 2 heads).")
_CPU_SEQ_LENS = flags.DEFINE_list("cpu_seq_lens", ["1024", "2048"], "CPU: sequence lengths (correctness).")
_CPU_BATCH = flags.DEFINE_integer("cpu_batch", 1, "CPU: batch.")
_CPU_HEADS = flags.DEFINE_integer("cpu_heads", 2, "CPU: query heads (kv heads = heads / --gqa).")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Measure nothing: rewrite README.md and attention.png "
                                 "from --out/results.json.")


def _record(label, case, **fields):
    return {"impl": label, "seq_len": case.seq_len, "head_dim": case.head_dim, "causal": case.causal,
            "batch": case.batch, "heads": case.heads, "kv_heads": case.kv_heads, "dtype": case.dtype, **fields}


def _run(label, case, measure):
    reasons = bench.unsupported(label, case)
    if reasons:
        return _record(label, case, unsupported="; ".join(reasons))
    try:
        return _record(label, case, **measure(label, case))
    except Exception as error:  # a failure is a result: record it and go on with the other cases
        traceback.print_exc()
        return _record(label, case, error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _RENDER_ONLY.value:
        results = json.loads((pathlib.Path(_OUT.value) / "results.json").read_text())
        print(f"rewrote {bench.write(results, _OUT.value)}/README.md, attention.png")
        return
    gpu = jax.default_backend() == "gpu"
    head_dims = [int(h) for h in _HEAD_DIMS.value]
    records, notes = [], []
    if gpu:
        mode = "speed"
        for dtype, T in ((d, int(t)) for d in (_DTYPES.value or ["bfloat16"]) for t in _SEQ_LENS.value):
            for H in head_dims:
                for causal in (False, True):
                    heads = _D_MODEL.value // H
                    case = bench.BenchCase(T, H, causal, max(1, _TOKENS.value // T), heads, heads // _GQA.value,
                                           dtype)
                    small = bench.BenchCase(T, H, causal, 1, 2 * _GQA.value, 2, dtype)
                    for label in _IMPLS.value:
                        record = _run(label, case, bench.measure_speed)
                        if T <= _ERROR_MAX_SEQ.value and "unsupported" not in record:
                            errors = _run(label, small, bench.measure_error)
                            record.update({key: value for key, value in errors.items()
                                           if key.endswith("_err") or key == "error"})
                        print(record, flush=True)
                        records.append(record)
        notes.append("Block sizes are the kernel defaults (unmeasured when written; see "
                     "jaxpar/kernels/flash_attention.py BlockSizes).")
    else:
        mode = "correctness"
        notes += [
            "**No GPU was available for this run: there are no timings (GPU TFLOP/s: not measured).** On this "
            "backend the Pallas kernel runs in interpret mode (the same kernel code at its default BlockSizes, "
            "executed by XLA), so only correctness is reported; cuDNN needs an NVIDIA GPU. Run this script on a "
            "GPU for TFLOP/s (the defaults then cover T = 1k..16k, head dims 64 and 128, causal and not, "
            "16k tokens per batch).",
        ]
        dtypes = _DTYPES.value or ["bfloat16", "float32"]
        for dtype, T in ((d, int(t)) for d in dtypes for t in _CPU_SEQ_LENS.value):
            for H in head_dims:
                for causal in (False, True):
                    case = bench.BenchCase(T, H, causal, _CPU_BATCH.value, _CPU_HEADS.value,
                                           _CPU_HEADS.value // _GQA.value, dtype)
                    for label in _IMPLS.value:
                        record = _run(label, case, bench.measure_error)
                        print(record, flush=True)
                        records.append(record)
    if gpu:
        shapes = (f"Shapes: batch = {_TOKENS.value} tokens / T, heads = {_D_MODEL.value} / head dim, "
                  f"{_GQA.value} query head(s) per kv head; self-attention. Errors: B=1, "
                  f"{2 * _GQA.value} heads, T <= {_ERROR_MAX_SEQ.value}.")
    else:
        shapes = (f"Shapes: B={_CPU_BATCH.value}, N={_CPU_HEADS.value}, K={_CPU_HEADS.value // _GQA.value}; "
                  "self-attention (Tq = Tk = T).")
    results = {"mode": mode, "machine": bench.machine(), "notes": notes, "shapes": shapes, "records": records}
    out = bench.write(results, _OUT.value)
    print(f"wrote {out}/results.json, README.md, attention.png")


if __name__ == "__main__":
    app.run(main)
