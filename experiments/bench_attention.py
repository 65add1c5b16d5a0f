"""Attention implementations side by side, in one run.

  python experiments/bench_attention.py --out=benchmarks/attention
  python experiments/bench_attention.py --render_only --out=benchmarks/attention

On a GPU: forward and forward+backward TFLOP/s of every available implementation (xla, xla_blockwise,
pallas, cudnn) for T in --seq_lens, head dims --head_dims, causal and not, with batch = --tokens / T and
heads = --d_model / head dim; plus the error against a float64 reference on a small slice.
Elsewhere (CPU): no timing (the Pallas kernel runs in interpret mode, which says nothing about speed),
only the error of each implementation against float64 for --cpu_seq_lens at --cpu_batch x --cpu_heads.
Writes results.json, README.md and attention.png into --out. The work is in jaxpar/bench/attention.py.
"""

import os

from absl import app, flags

from jaxpar.bench import attention

_OUT = flags.DEFINE_string(
    "out", "benchmarks/attention", "Directory for results.json, README.md and attention.png."
)
_IMPLS = flags.DEFINE_list(
    "implementations",
    list(attention.IMPLEMENTATIONS),
    "Labels to run (unavailable ones are recorded as such).",
)
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384"], "GPU sequence lengths.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dims.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "GPU: batch = tokens / T.")
_D_MODEL = flags.DEFINE_integer("d_model", 2048, "GPU: heads = d_model / head dim.")
_GQA = flags.DEFINE_integer("gqa", 1, "Query heads per kv head.")
_DTYPES = flags.DEFINE_list(
    "dtypes", None, "Input dtypes (default: bfloat16 on GPU; bfloat16 and float32 elsewhere)."
)
_ITERS = flags.DEFINE_integer("iters", 10, "Timed iterations (median reported).")
_ERROR_MAX_SEQ = flags.DEFINE_integer(
    "error_max_seq", 2048, "GPU: measure errors up to this T (B=1, 2 heads)."
)
_CPU_SEQ_LENS = flags.DEFINE_list("cpu_seq_lens", ["1024", "2048"], "CPU: sequence lengths (correctness).")
_CPU_BATCH = flags.DEFINE_integer("cpu_batch", 1, "CPU: batch.")
_CPU_HEADS = flags.DEFINE_integer("cpu_heads", 2, "CPU: query heads (kv heads = heads / --gqa).")
_RENDER_ONLY = flags.DEFINE_bool(
    "render_only", False, "Measure nothing: rewrite README.md and attention.png from --out/results.json."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _RENDER_ONLY.value:
        attention.render(_OUT.value)
        print(f"rewrote {_OUT.value}/README.md, attention.png")
        return
    # No preallocated GPU memory pool. The GPU backend reads this when it starts, so setting it here, before
    # the first jax operation, is early enough.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    attention.run(
        _OUT.value,
        _IMPLS.value,
        [int(h) for h in _HEAD_DIMS.value],
        _GQA.value,
        _DTYPES.value,
        seq_lens=[int(t) for t in _SEQ_LENS.value],
        tokens=_TOKENS.value,
        d_model=_D_MODEL.value,
        iters=_ITERS.value,
        error_max_seq=_ERROR_MAX_SEQ.value,
        cpu_seq_lens=[int(t) for t in _CPU_SEQ_LENS.value],
        cpu_batch=_CPU_BATCH.value,
        cpu_heads=_CPU_HEADS.value,
    )


if __name__ == "__main__":
    app.run(main)
