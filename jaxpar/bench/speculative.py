"""Speculative sampling benchmark (the work behind experiments/bench_speculative.py), one process:

A target (configs/lm.py:smoke, trained on the stdlib corpus) and a draft (a quarter of its width, one layer,
same corpus and steps) are trained once (kept in --runs, resumed if there). Then, on the same prompts, for
k = 1..8 drafted tokens and 1 and 8 slots: mean tokens per decoding round (accepted proposals + the
corrected or bonus token; prefill excluded), target forwards per generated token (prefill included), and
wall-clock time against plain decoding with the same engine settings, contenders interleaved, warm
(compile reported apart), greedy and at temperature 1.

`run_medusa` adds Medusa rows to the same results.json: MEDUSA_HEADS heads trained on the frozen target
(train.init_from), then the same prompts and measures for chains through the first 1..4 heads (one
candidate per head) and a tree (MEDUSA_TREES), against plain decoding in the same process.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import numpy as np
from absl import logging

from jaxpar import machine
from jaxpar.bench import common
from jaxpar.config import from_config_dict
from jaxpar.infer import model as model_lib
from jaxpar.infer.engine import Engine, Request
from jaxpar.infer.sampling import SamplingParams
from jaxpar.train import metrics as metrics_lib
from jaxpar.train.loop import train

KS = tuple(range(1, 9))
MEDUSA_HEADS, MEDUSA_STEPS = 4, 200
MEDUSA_TREES = ((1, 1), (1, 2), (1, 3), (1, 4), (3, 16))  # (width, candidates)
SLOTS = (1, 8)
PROMPTS, PROMPT_BYTES, NEW = 8, 48, 64
REPEATS = 2


def train_pair(config, runs: str) -> tuple[str, str]:
    """(target workdir, draft workdir), trained to their configured steps (resumed when present)."""
    target_dir, draft_dir = os.path.join(runs, "target"), os.path.join(runs, "draft")
    target = from_config_dict(config)
    raw = config.to_dict()
    raw["model"].update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=96)
    raw["mesh"].update(data=8, fsdp=1, tensor=1)
    draft = from_config_dict(raw)
    for run, workdir in ((target, target_dir), (draft, draft_dir)):
        train(run, workdir)
    return target_dir, draft_dir


def stdlib_prompts() -> list[str]:
    """The first PROMPT_BYTES characters of a few standard-library modules (text the models trained on)."""
    root = os.path.dirname(os.__file__)
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))[::17][:PROMPTS]
    out = []
    for name in names:
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            out.append(f.read()[:PROMPT_BYTES])
    return out


def _run(engine, prompts, temperature):
    """(seconds, generated tokens, decoding rounds, rounds summed over the slots in them) of one call."""
    requests = [
        Request(list(p.encode()), SamplingParams(max_tokens=NEW, temperature=temperature, seed=i))
        for i, p in enumerate(prompts)
    ]
    rounds, slot_rounds = engine.decoder.rounds, engine.slot_rounds
    start = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    made = sum(len(r.token_ids) for r in results)
    return seconds, made, engine.decoder.rounds - rounds, engine.slot_rounds - slot_rounds


def measure(target, draft, prompts) -> list[dict]:
    rows = []
    settings = dict(capacity=PROMPT_BYTES + NEW + 16, prefill_chunk=64, cache_dtype="float32")
    for slots in SLOTS:
        plain = Engine(target, slots=slots, **settings)
        start = time.perf_counter()
        _run(plain, prompts, 0.0)
        plain_first = time.perf_counter() - start
        for k in (*KS, "adaptive"):
            adaptive = k == "adaptive"
            spec = Engine(
                target,
                slots=slots,
                draft=draft,
                num_draft=KS[-1] if adaptive else k,
                adaptive_draft=adaptive,
                **settings,
            )
            start = time.perf_counter()
            _run(spec, prompts, 0.0)
            first = time.perf_counter() - start
            for temperature in (0.0, 1.0):
                times = {"plain": [], "speculative": []}
                chosen_before = len(spec.decoder.chosen)
                for _ in range(REPEATS):  # interleaved
                    for name, engine in (("plain", plain), ("speculative", spec)):
                        seconds, tokens, rounds, per_slot = _run(engine, prompts, temperature)
                        times[name].append(seconds)
                        if name == "speculative":
                            made, spec_rounds, slot_rounds = tokens, rounds, per_slot
                row = {
                    "slots": slots,
                    "k": k,
                    "temperature": temperature,
                    # tokens per round: each request's first token comes from its prefill
                    "tokens_per_round": (made - len(prompts)) / slot_rounds,
                    "target_forwards_per_token": (spec_rounds + len(prompts)) / made,
                    "plain_s": statistics.median(times["plain"]),
                    "speculative_s": statistics.median(times["speculative"]),
                    "first_call_s": {"plain": plain_first, "speculative": first},
                }
                row["speedup"] = row["plain_s"] / row["speculative_s"]
                if adaptive:
                    row["mean_k"] = float(np.mean(spec.decoder.chosen[chosen_before:]))
                logging.info("speculative %s", row)
                rows.append(row)
    return rows


def _k(row) -> str:
    return f"adaptive 1..{KS[-1]} (mean {row['mean_k']:.1f})" if row["k"] == "adaptive" else str(row["k"])


def train_medusa(config, runs: str) -> str:
    """The workdir of MEDUSA_HEADS heads trained on the target's newest checkpoint (the target trained
    first when it has no checkpoint)."""
    target = from_config_dict(config)
    target_dir, heads_dir = os.path.join(runs, "target"), os.path.join(runs, "medusa")
    if not os.path.isdir(os.path.join(target_dir, "checkpoints", str(target.train.steps))):
        train(target, target_dir)
    raw = config.to_dict()
    raw["model"]["medusa_heads"] = MEDUSA_HEADS
    raw["train"].update(init_from=target_dir, steps=MEDUSA_STEPS)
    raw["optimizer"]["warmup_steps"] = MEDUSA_STEPS // 10
    train(from_config_dict(raw), heads_dir)
    return heads_dir


def measure_medusa(model, prompts) -> list[dict]:
    rows = []
    settings = dict(capacity=PROMPT_BYTES + NEW + 16, prefill_chunk=64, cache_dtype="float32")
    for slots in SLOTS:
        plain = Engine(model, slots=slots, **settings)
        _run(plain, prompts, 0.0)
        for width, candidates in MEDUSA_TREES:
            medusa = Engine(model, slots=slots, medusa_width=width, medusa_candidates=candidates, **settings)
            start = time.perf_counter()
            _run(medusa, prompts, 0.0)
            first = time.perf_counter() - start
            for temperature in (0.0, 1.0):
                times = {"plain": [], "medusa": []}
                for _ in range(REPEATS):  # interleaved
                    for name, engine in (("plain", plain), ("medusa", medusa)):
                        seconds, tokens, rounds, per_slot = _run(engine, prompts, temperature)
                        times[name].append(seconds)
                        if name == "medusa":
                            made, medusa_rounds, slot_rounds = tokens, rounds, per_slot
                row = {
                    "slots": slots,
                    "width": width,
                    "candidates": candidates,
                    "depth": max(medusa.decoder.tree.depth),
                    "temperature": temperature,
                    "tokens_per_round": (made - len(prompts)) / slot_rounds,
                    "target_forwards_per_token": (medusa_rounds + len(prompts)) / made,
                    "plain_s": statistics.median(times["plain"]),
                    "medusa_s": statistics.median(times["medusa"]),
                    "first_call_s": first,
                }
                row["speedup"] = row["plain_s"] / row["medusa_s"]
                logging.info("medusa %s", row)
                rows.append(row)
    return rows


def medusa_section(medusa: dict) -> list[str]:
    lines = [
        "",
        "## Medusa heads",
        "",
        f"`python experiments/bench_speculative.py --medusa` on {machine.summary(medusa['machine'])}; load "
        f"average {medusa['load_average']} at the start. {MEDUSA_HEADS} Medusa-1 heads "
        f"({medusa['head_params']:,} parameters) trained {medusa['steps']} steps on the frozen target above "
        f"(heads' summed loss {medusa['loss_first']:.2f} at step 1, {medusa['loss_last']:.2f} at the last "
        "step); same prompts, settings and measures as the draft rows.",
        "A chain (width 1) verifies the top choice of each of the first `depth` heads; a tree verifies "
        "`width` choices per head, breadth first, at most `candidates` nodes, in one forward with a tree "
        "attention mask (jaxpar.infer.medusa). Greedy output equals plain greedy; sampling is exact "
        "(multi-draft rejection).",
        "",
        "| slots | temperature | width | candidates | depth | tokens / round | target fwd / token "
        "| plain (s) | medusa (s) | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in medusa["rows"]:
        lines.append(
            f"| {r['slots']} | {r['temperature']:g} | {r['width']} | {r['candidates']} | {r['depth']} | "
            f"{r['tokens_per_round']:.2f} | {r['target_forwards_per_token']:.3f} | {r['plain_s']:.2f} | "
            f"{r['medusa_s']:.2f} | {r['speedup']:.2f}x |"
        )
    return lines


def run_medusa(out: str, config, runs: str) -> None:
    """Adds the Medusa rows to `out`/results.json (the draft rows kept) and rewrites the README."""
    load = round(os.getloadavg()[0], 2)
    heads_dir = train_medusa(config, runs)
    model = model_lib.load_workdir(heads_dir, model_lib.inference_mesh())
    losses = [
        r["loss"] for r in metrics_lib.read_metrics(os.path.join(heads_dir, "metrics.jsonl")) if "loss" in r
    ]
    head_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(model.params["medusa"])))
    results = common.read_results(out, missing_ok=True)
    results["medusa"] = {
        "machine": machine.describe(),
        "load_average": load,
        "steps": MEDUSA_STEPS,
        "head_params": head_params,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "rows": measure_medusa(model, stdlib_prompts()),
    }
    common.write_results(out, results)
    if "rows" in results:
        common.write_readme(out, readme(results))


def readme(results: dict) -> str:
    lines = [
        "# Speculative sampling with a draft model",
        "",
        f"`python experiments/bench_speculative.py` on {machine.summary(results['machine'])}; load average "
        f"{results['load_average']} at the start.",
        f"Target: `configs/lm.py:smoke` ({results['target_params']:,} parameters) trained "
        f"{results['steps']} steps on the stdlib corpus; draft: {results['draft_params']:,} parameters "
        "(1 layer, d_model 32), same data and steps. Inference on one CPU device, float32, KV caches in "
        "float32.",
        f"{PROMPTS} prompts (the first {PROMPT_BYTES} bytes of standard-library modules), {NEW} tokens each. "
        f"Wall clock: median of {REPEATS} interleaved repeats against plain decoding with the same engine "
        "settings, warm.",
        "",
        "`tokens / round`: accepted proposals + 1 per decoding round of a slot (a round is one target "
        "forward over k + 1 tokens and k + 1 draft steps for every slot); plain decoding makes 1. "
        "`target fwd / token`: target forwards (rounds + prefills) per generated token. `adaptive`: k "
        "chosen every round from the acceptance so far and the measured round times "
        "(jaxpar.infer.speculative.DraftLength); mean k over the measured rounds.",
        "",
        "| slots | temperature | k | tokens / round | target fwd / token | plain (s) | speculative (s) "
        "| speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['slots']} | {r['temperature']:g} | {_k(r)} | {r['tokens_per_round']:.2f} | "
            f"{r['target_forwards_per_token']:.3f} | {r['plain_s']:.2f} | {r['speculative_s']:.2f} | "
            f"{r['speedup']:.2f}x |"
        )
    lines += [
        "",
        "![tokens per round vs k](acceptance.png)",
        "",
        "Tokens per round depend only on the requests, not on the slots: every request samples the same "
        "tokens alone or batched (the engine's batch invariance), so the 1- and 8-slot rows agree. Whether "
        "fewer target forwards buy time depends on what a forward costs: see the speedup column, measured "
        "on this CPU with a 0.46 M-parameter target; it is not a GPU figure.",
    ]
    if "medusa" in results:
        lines += medusa_section(results["medusa"])
    return "\n".join(lines) + "\n"


def plot(results: dict, out: str) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for slots in SLOTS:
        for temperature in (0.0, 1.0):
            rows = [
                r
                for r in results["rows"]
                if r["slots"] == slots and r["temperature"] == temperature and r["k"] != "adaptive"
            ]
            ax.plot(
                [r["k"] for r in rows],
                [r["tokens_per_round"] for r in rows],
                "o-",
                label=f"{slots} slot(s), T={temperature:g}",
            )
    ax.plot(KS, [k + 1 for k in KS], "k:", label="all accepted (k + 1)")
    ax.set(xlabel="k (drafted tokens per round)", ylabel="tokens per round of a slot")
    ax.set_title("1- and 8-slot lines coincide (batch invariance)")
    ax.legend()
    common.save_figure(fig, os.path.join(out, "acceptance.png"), dpi=120)


def run(out: str, config, runs: str) -> None:
    load = round(os.getloadavg()[0], 2)
    target_dir, draft_dir = train_pair(config, runs)
    mesh = model_lib.inference_mesh()
    target = model_lib.load_workdir(target_dir, mesh)
    draft = model_lib.load_workdir(draft_dir, mesh)
    count = lambda model: int(sum(np.prod(x.shape) for x in jax.tree.leaves(model.params)))
    results = {
        "machine": machine.describe(),
        "load_average": load,
        "steps": from_config_dict(config).train.steps,
        "target_params": count(target),
        "draft_params": count(draft),
        "rows": measure(target, draft, stdlib_prompts()),
    }
    common.write_results(out, results)
    common.write_readme(out, readme(results))
    plot(results, out)


def render(out: str) -> None:
    results = common.read_results(out)
    common.write_readme(out, readme(results))
    plot(results, out)
