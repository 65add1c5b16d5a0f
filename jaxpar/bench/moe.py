"""MoE benchmarks on 8 simulated CPU devices (the work behind experiments/bench_moe.py): all-to-all bytes
of the compiled train step vs the analytic count, per-device memory for expert = 1..8, and the
dropped-token fraction vs capacity factor after a short training run on the smoke corpus.
"""

import dataclasses
import os
import tempfile

import jax
from absl import logging
from ml_collections import ConfigDict

from jaxpar import machine
from jaxpar.bench import common
from jaxpar.config import from_config_dict
from jaxpar.parallel import analysis
from jaxpar.parallel.mesh import make_mesh
from jaxpar.train import build as build_lib
from jaxpar.train.loop import train
from jaxpar.train.metrics import read_metrics

DEVICES = 8  # data x expert of every mesh measured
MB = 2**20


def run_config(config: ConfigDict, **mesh_and_moe):
    c = config.to_dict()
    for key, value in mesh_and_moe.items():
        section, name = key.split("__")
        (c["mesh"] if section == "mesh" else c["model"]["moe"])[name] = value
    return from_config_dict(c)


def expected_all_to_all_bytes(run, ep: int) -> int:
    """Dropless dispatch per layer: forward sends the assignments out and the results back (two
    all-to-alls of [ep, A, D] plus the [ep, A] int32 expert ids), backward sends both gradients (two
    more); A = local tokens x top_k. Module convention: operand bytes per device."""
    if ep == 1:
        return 0
    model, train_cfg = run.model, run.train
    local_tokens = train_cfg.global_batch * train_cfg.seq_len // jax.device_count()
    A = local_tokens * model.moe.top_k
    activations = ep * A * model.d_model * 4  # float32 compute in moe_smoke
    return model.n_layers * (4 * activations + ep * A * 4)


def scaling(config: ConfigDict):
    rows = []
    for ep in (1, 2, 4, 8):
        run = run_config(config, mesh__data=8 // ep, mesh__expert=ep)
        program = build_lib.build(run, make_mesh(run.mesh.resolve(jax.device_count())))
        compiled, abstract = program.compile(), program.abstract
        measured = analysis.collective_bytes(compiled)
        rows.append(
            {
                "expert": ep,
                "data": 8 // ep,
                "all_to_all_measured": measured["all-to-all"],
                "all_to_all_expected": expected_all_to_all_bytes(run, ep),
                "collectives_total": measured["total"],
                **{f"state_{k}": v for k, v in analysis.state_bytes_per_device(abstract).items()},
                **analysis.memory(compiled),
            }
        )
        logging.info("expert=%d: %s", ep, rows[-1])
    return rows


def dropping(config: ConfigDict, workdir: str, steps: int):
    rows = []
    for factor in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 0.0):
        run = run_config(config, moe__capacity_factor=factor)
        run = dataclasses.replace(
            run,
            train=dataclasses.replace(run.train, steps=steps, log_every=5, eval_every=0, checkpoint_every=0),
        )
        path = os.path.join(workdir, f"cf{factor}")
        train(run, path)
        records = [r for r in read_metrics(os.path.join(path, "metrics.jsonl")) if "loss" in r]
        late = records[len(records) // 2 :]
        rows.append(
            {
                "capacity_factor": factor,
                "dropped_fraction": sum(r["moe_dropped_fraction"] for r in late) / len(late),
                "final_loss": records[-1]["loss"],
                "max_load_over_mean": records[-1]["moe_max_load_over_mean"],
            }
        )
        logging.info("capacity factor %s: %s", factor, rows[-1])
    return rows


def readme(results: dict) -> str:
    lines = [
        "# MoE: dispatch bytes, memory, dropping",
        "",
        f"`python experiments/bench_moe.py` on {machine.summary(results['machine'])}.",
        "Config `configs/lm.py:moe_smoke` (8 experts, top-2, dropless unless a capacity factor is given),",
        "8 simulated CPU devices, global batch 16 x 128 tokens. Bytes per device per step, operand "
        "convention",
        "of `jaxpar/parallel/analysis.py`.",
        "",
        "| mesh | all-to-all measured (MB) | expected (MB) | ratio | all collectives (MB) | "
        "params+opt / device (MB) | temporaries (MB) | peak estimate (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["scaling"]:
        expected = r["all_to_all_expected"]
        ratio = r["all_to_all_measured"] / expected if expected else float("nan")
        lines.append(
            f"| data={r['data']} x expert={r['expert']} | {r['all_to_all_measured'] / MB:.2f} | "
            f"{r['all_to_all_expected'] / MB:.2f} | {ratio:.3f} | {r['collectives_total'] / MB:.2f} | "
            f"{r['state_total'] / MB:.2f} | {r['temp_bytes'] / MB:.2f} | {r['peak_estimate'] / MB:.2f} |"
        )
    lines += [
        "",
        f"Dropped fraction of (token, choice) assignments vs capacity factor, averaged over the second half "
        f"of a {results['steps']}-step run on the smoke corpus (data=2 x expert=4; capacity per expert and "
        "device = ceil(factor x local tokens x top_k / experts); 0 = dropless):",
        "",
        "| capacity factor | dropped fraction | final loss | max load / mean load |",
        "|---|---|---|---|",
    ]
    for r in results["dropping"]:
        lines.append(
            f"| {r['capacity_factor']} | {r['dropped_fraction']:.4f} | {r['final_loss']:.4f} | "
            f"{r['max_load_over_mean']:.3f} |"
        )
    lines += [
        "",
        "No GPU was available in this session: dropless vs dropping tokens/s on an H100 is not measured.",
    ]
    return "\n".join(lines) + "\n"


def run(out: str, config: ConfigDict, steps: int) -> None:
    """`config` (a moe_smoke-like ConfigDict) measured over the meshes and trained `steps` steps per
    capacity factor; results.json and README.md into `out`."""
    results = {
        "machine": machine.describe(),
        "steps": steps,
        "scaling": scaling(config),
    }
    with tempfile.TemporaryDirectory() as workdir:
        results["dropping"] = dropping(config, workdir, steps)
    common.write_results(out, results)
    common.write_readme(out, readme(results))


def render(out: str) -> None:
    """README.md again from `out`/results.json; nothing measured."""
    common.write_readme(out, readme(common.read_results(out)))
