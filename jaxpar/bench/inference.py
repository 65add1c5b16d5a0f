"""Inference benchmarks (the work behind experiments/bench_inference.py), all measured in one process:

1. Decode throughput vs slots: the engine (KV cache, continuous batching) against a no-cache baseline that
   recomputes the forward over the whole sequence (padded to its final length: one compiled program) for
   every new token; same model, same prompts, contenders interleaved, each timed warm (compile reported
   apart). Generated tokens per second, and the ratio.
2. Serving latency: the OpenAI-compatible server on 127.0.0.1 (uvicorn on a thread), streamed completions
   sent by an async client at Poisson arrival rates; time to first token and inter-token latency, p50/p99.
3. KV-cache bytes per token: the allocated cache over slots x capacity against the analytic count.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxpar import machine
from jaxpar.bench import common
from jaxpar.config import from_config_dict
from jaxpar.infer import model as model_lib
from jaxpar.infer.cache import cache_bytes_per_token
from jaxpar.infer.engine import Engine, Request
from jaxpar.infer.sampling import SamplingParams
from jaxpar.infer.text import ByteTokenizer
from jaxpar.models.llama import Transformer

PROMPT, NEW = 32, 64  # tokens per prompt, tokens generated per request
SLOTS = (1, 2, 4, 8, 16, 32)
RATES = (4.0, 16.0, 64.0, 256.0)  # requests per second offered to the server (8 slots serve ~60)
REQUESTS_PER_RATE = 48
REPEATS = 3


def random_model(config) -> model_lib.LoadedModel:
    cfg = from_config_dict(config).model
    with nnx.use_eager_sharding(False):
        params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
    return model_lib.from_params(cfg, params, model_lib.inference_mesh(), ByteTokenizer(), name="bench")


def prompts(n: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, PROMPT).tolist() for _ in range(n)]


def no_cache_generate(model, batch: list[list[int]], new: int, forward) -> int:
    """Greedy tokens for `batch` by a full forward per token over [B, PROMPT + new]; returns tokens made."""
    tokens = np.zeros((len(batch), PROMPT + new), np.int32)
    tokens[:, :PROMPT] = batch
    for t in range(PROMPT, PROMPT + new):
        tokens[:, t] = np.asarray(forward(model.params, tokens, t - 1))
    return len(batch) * new


def make_no_cache_forward(model):
    def forward(params, tokens_BT, last):
        B, T = tokens_BT.shape
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        logits = nnx.merge(model.graphdef, params)(tokens_BT, positions, jnp.zeros_like(tokens_BT))
        return jnp.argmax(logits[:, last], axis=-1)

    return jax.jit(forward)


def throughput(model) -> list[dict]:
    greedy = SamplingParams(max_tokens=NEW, temperature=0.0)
    forward = make_no_cache_forward(model)
    rows = []
    for slots in SLOTS:
        engine = Engine(
            model, slots=slots, capacity=PROMPT + NEW + 1, prefill_chunk=32, cache_dtype="float32"
        )
        batch = prompts(slots, model.cfg.vocab_size)
        cached = lambda: sum(len(r.token_ids) for r in engine.generate([Request(p, greedy) for p in batch]))
        plain = lambda: no_cache_generate(model, batch, NEW, forward)
        compile_s = {}
        for name, fn in (("cached", cached), ("no_cache", plain)):
            start = time.perf_counter()
            fn()
            compile_s[name] = time.perf_counter() - start
        timings = {"cached": [], "no_cache": []}
        for _ in range(REPEATS):  # interleaved
            for name, fn in (("cached", cached), ("no_cache", plain)):
                start = time.perf_counter()
                made = fn()
                timings[name].append(made / (time.perf_counter() - start))
        row = {
            "slots": slots,
            "cached_tok_s": statistics.median(timings["cached"]),
            "no_cache_tok_s": statistics.median(timings["no_cache"]),
            "first_call_s": compile_s,
            "programs": engine.compiled_programs(),
        }
        row["speedup"] = row["cached_tok_s"] / row["no_cache_tok_s"]
        logging.info("throughput %s", row)
        rows.append(row)
    return rows


async def _one_request(client, url, name, prompt, arrival):
    """(time to first token, inter-token gaps) of one streamed completion."""
    body = {"model": name, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "stream": True}
    first, gaps, last = None, [], None
    async with client.stream("POST", f"{url}/completions", json=body, timeout=600) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if not chunk["choices"][0].get("token_ids"):
                continue
            now = time.perf_counter()
            if first is None:
                first = now - arrival
            else:
                gaps.append(now - last)
            last = now
    return first, gaps


async def _load(url, name, rate, n, rng):
    import httpx

    async with httpx.AsyncClient() as client:
        tasks, start = [], time.perf_counter()
        arrival = start
        for i in range(n):
            arrival += rng.exponential(1.0 / rate)
            await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
            prompt = "".join(chr(97 + (i * 7 + j) % 26) for j in range(PROMPT))
            tasks.append(asyncio.create_task(_one_request(client, url, name, prompt, time.perf_counter())))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def serving(model, slots: int) -> list[dict]:
    from jaxpar.infer.server import make_app, serve_in_thread

    engine = Engine(model, slots=slots, capacity=PROMPT + NEW + 1, prefill_chunk=32)
    server, thread, url = serve_in_thread(make_app(engine))
    rng = np.random.default_rng(0)
    rows = []
    try:
        asyncio.run(_load(url, model.name, 100.0, slots, rng))  # warm: compiles prefill and decode
        for rate in RATES:
            results, wall = asyncio.run(_load(url, model.name, rate, REQUESTS_PER_RATE, rng))
            ttft = [r[0] for r in results]
            itl = [g for r in results for g in r[1]]
            rows.append(
                {
                    "rate": rate,
                    "requests": len(results),
                    "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
                    "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
                    "itl_p50_ms": 1e3 * float(np.percentile(itl, 50)),
                    "itl_p99_ms": 1e3 * float(np.percentile(itl, 99)),
                    "tok_s": sum(len(r[1]) + 1 for r in results) / wall,
                }
            )
            logging.info("serving %s", rows[-1])
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    return rows


def cache_bytes(model) -> list[dict]:
    rows = []
    for dtype in ("bfloat16", "float32"):
        engine = Engine(model, slots=4, capacity=128, cache_dtype=dtype)
        rows.append(
            {
                "dtype": dtype,
                "allocated_per_token": engine.cache_bytes / (4 * 128),
                "analytic_per_token": cache_bytes_per_token(model.cfg, dtype),
            }
        )
    return rows


def readme(results: dict) -> str:
    cfg = results["model"]
    lines = [
        "# Inference: decode throughput, serving latency, KV-cache bytes",
        "",
        f"`python experiments/bench_inference.py` on {machine.summary(results['machine'])}; load average "
        f"{results['load_average']} at the start.",
        f"Model: `{results['config']}` with random weights ({cfg['n_layers']} layers, "
        f"d_model {cfg['d_model']}, {cfg['n_heads']} heads / {cfg['n_kv_heads']} KV heads, "
        f"vocab {cfg['vocab_size']}), one CPU device, float32 compute. Prompts of {PROMPT} tokens, "
        f"{NEW} tokens generated per request, greedy.",
        "",
        "## Decode throughput vs slots (ratio against no cache, same run)",
        "",
        "Generated tokens per second, warm (median of "
        f"{REPEATS} interleaved repeats; prefill included). No-cache baseline: a full forward over the "
        f"[slots, {PROMPT + NEW}] sequence (padded to its final length, one program) per token.",
        "",
        "| slots | engine tok/s | no-cache tok/s | speedup | engine first call (s, compile incl.) | "
        "no-cache first call (s) | programs compiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["throughput"]:
        lines.append(
            f"| {r['slots']} | {r['cached_tok_s']:.0f} | {r['no_cache_tok_s']:.0f} | {r['speedup']:.2f}x | "
            f"{r['first_call_s']['cached']:.2f} | {r['first_call_s']['no_cache']:.2f} | {r['programs']} |"
        )
    lines += [
        "",
        f"## Serving latency (end to end, {results['serving_slots']} slots, bf16 KV cache)",
        "",
        f"{REQUESTS_PER_RATE} streamed completions per rate, Poisson arrivals, from one async httpx "
        "client in the same process as the server (they share the 2 cores).",
        "",
        "| offered rate (req/s) | TTFT p50 (ms) | TTFT p99 (ms) | inter-token p50 (ms) "
        "| inter-token p99 (ms) | delivered tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["serving"]:
        lines.append(
            f"| {r['rate']:g} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} | "
            f"{r['itl_p99_ms']:.1f} | {r['tok_s']:.0f} |"
        )
    lines += [
        "",
        "## KV-cache bytes per token",
        "",
        "| dtype | allocated / (slots x capacity) | analytic (2 x layers x KV heads x head dim x bytes) |",
        "|---|---|---|",
    ]
    for r in results["cache_bytes"]:
        lines.append(f"| {r['dtype']} | {r['allocated_per_token']:.0f} | {r['analytic_per_token']} |")
    lines += [
        "",
        "![tokens/s vs slots](throughput.png)",
        "",
        "CPU figures say how the engine scales with slots and what the cache buys; they are not GPU "
        "figures. No GPU was lent to this session: the Pallas decode kernel's speed is not measured here.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, out: str) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    slots = [r["slots"] for r in results["throughput"]]
    ax.plot(slots, [r["cached_tok_s"] for r in results["throughput"]], "o-", label="engine (KV cache)")
    ax.plot(slots, [r["no_cache_tok_s"] for r in results["throughput"]], "s--", label="no cache")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="slots",
        ylabel="generated tokens / s",
        title="Decode throughput (CPU)",
    )
    ax.set_xticks(slots, [str(s) for s in slots])
    ax.legend()
    common.save_figure(fig, f"{out}/throughput.png", dpi=120)


def run(out: str, config, config_name: str, serving_slots: int) -> None:
    model = random_model(config)
    results = {
        "machine": machine.describe(),
        "load_average": round(os.getloadavg()[0], 2),
        "config": config_name,
        "model": dataclasses.asdict(model.cfg),
        "throughput": throughput(model),
        "serving_slots": serving_slots,
        "serving": serving(model, serving_slots),
        "cache_bytes": cache_bytes(model),
    }
    common.write_results(out, results)
    common.write_readme(out, readme(results))
    plot(results, out)


def render(out: str) -> None:
    results = common.read_results(out)
    common.write_readme(out, readme(results))
    plot(results, out)
