"""The memory planner (issue 18): its per-device memory model against XLA's buffer assignment (a loose
bound here; benchmarks/memory/ has the tight figures), its search, and the refusal of a run that
cannot fit, naming the best fitting alternative."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from configs import lm
from jaxpar.config import ConfigError, from_config_dict
from jaxpar.parallel.mesh import make_mesh
from jaxpar.plan import accuracy, devices, report, search
from jaxpar.train import fit
from run_testing import ENV, ROOT

GiB = 2**30


def _case(name):
    _, preset, overrides = next(case for case in accuracy.CASES if case[0] == name)
    return accuracy.run_config(lm.get_config(preset), overrides)


@pytest.mark.parametrize(
    "name", ["smoke", "small remat=full", "moe_smoke expert8", "long_smoke allgather", "pipeline 1f1b M8"]
)
def test_predicted_memory_near_compiled(name):
    """The estimate (no compile) within 30% of the compiled step's peak on dense, MoE, sequence-parallel
    and pipelined configs; the state part exactly: arguments are the state and the batch."""
    result = accuracy.compare(_case(name))
    assert abs(result["error"]) < 0.30, result
    p, m = result["predicted"], result["compiled"]
    step_counter = 4  # the int32 step
    assert p["params"] + p["opt_state"] + p["batch"] + step_counter == pytest.approx(
        m["argument_bytes"], abs=64
    )


def test_remat_policies_order_the_activations():
    run = _case("small")
    sizes = {"pipeline": 1, "data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2}
    acts = {
        remat: fit.estimate(
            dataclasses.replace(run, model=dataclasses.replace(run.model, remat=remat)), sizes
        )["activations"]
        for remat in ("none", "save_dots", "full", "offload")
    }
    assert acts["full"] < acts["save_dots"] < acts["none"]
    # remat 'offload' keeps on the device what 'full' keeps; save_dots' other residuals go to the host
    offload = dataclasses.replace(run, model=dataclasses.replace(run.model, remat="offload"))
    assert acts["offload"] == acts["full"]
    assert fit.estimate(offload, sizes)["host"] == pytest.approx(acts["save_dots"] - acts["full"], rel=0.05)
    # accumulation over 4 microbatches keeps a quarter of the residuals alive
    accum = dataclasses.replace(run, train=dataclasses.replace(run.train, grad_accum_steps=4))
    assert fit.estimate(accum, sizes)["activations"] == pytest.approx(acts["none"] / 4, rel=0.02)


def test_planner_on_16_h100s():
    """llama_7b on 16 H100s with 80 GB: fitting plans ranked by predicted step time, every rejection with
    a reason, and a frontier where more memory always buys speed."""
    run = from_config_dict(lm.get_config("llama_7b"))
    plans = search.search(run, 16, 80 * GiB, devices.device_kind("H100"))
    fitting = [p for p in plans if p.fits]
    assert fitting and all(p.memory["total"] <= 80 * GiB for p in fitting)
    times = [p.cost.step_s for p in fitting]
    assert times == sorted(times)
    assert all(p.reason for p in plans if not p.fits)
    assert any(p.reason.startswith("needs") for p in plans) and any(
        p.reason.startswith("invalid") for p in plans
    )
    axes_used = {axis for p in fitting for axis, size in p.sizes.items() if size > 1}
    assert {"data", "fsdp", "tensor", "pipeline", "sequence"} <= axes_used
    front = search.frontier(plans)
    assert [p.memory["total"] for p in front] == sorted(p.memory["total"] for p in front)
    assert [p.cost.step_s for p in front] == sorted((p.cost.step_s for p in front), reverse=True)
    # On one device nothing fits: the fp32 state alone is 16 bytes per parameter.
    assert not any(p.fits for p in search.search(run, 1, 80 * GiB, devices.device_kind("H100")))


def test_device_memory_parsing_and_kinds():
    assert report.parse_bytes("80GB") == 80 * GiB == report.parse_bytes("80 GiB") == report.parse_bytes("80")
    assert report.parse_bytes("512MB") == 512 * 2**20
    with pytest.raises(ValueError, match="'lots' is not a size"):
        report.parse_bytes("lots")
    assert devices.for_device("NVIDIA H100 80GB HBM3").name == "H100"
    assert devices.for_device("TPU v5 lite").name == "TPU v5e"
    assert devices.device_kind("tpu_v4").name == "TPU v4"
    with pytest.raises(ValueError, match="not in the roofline table"):
        devices.device_kind("B200")


def test_configured_device_memory_refuses_with_the_numbers():
    run = _case("small")
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, device_memory_gb=0.05))
    with pytest.raises(
        fit.DoesNotFit, match=r"needs about [\d.]+ GiB .* has 0\.05 GiB \(train\.device_memory_gb"
    ):
        fit.check_fits(run, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), None)
    with pytest.raises(ConfigError, match=r"train.device_memory_gb=-1.0 must be a finite number >= 0"):
        dataclasses.replace(run.train, device_memory_gb=-1.0)


def test_too_large_run_refused_with_the_planners_alternative(tmp_path):
    """train_lm.py refuses before creating anything and names a plan that fits; that plan does fit."""
    limit_gb = 0.12
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "train_lm.py"),
            f"--config={os.path.join(ROOT, 'configs', 'lm.py')}:small",
            f"--workdir={tmp_path}",
            "--config.mesh.data=8",
            "--config.mesh.fsdp=1",
            "--config.mesh.tensor=1",
            f"--config.train.device_memory_gb={limit_gb}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=ROOT,
    )
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: this run needs about") and "The planner's best fitting alternative" in line
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")
    overrides = dict(re.findall(r"--config\.([\w.]+)=(\S+)", line.split("alternative", 1)[1]))
    assert (
        overrides["mesh.data"] != "8"
        or overrides["model.remat"] != "none"
        or overrides.get("train.grad_accum_steps") not in (None, "1")
    )
    values = {
        k: {"True": True, "False": False}.get(v, int(v) if v.isdigit() else v.rstrip(")"))
        for k, v in overrides.items()
    }
    base = lm.get_config("small")
    run = accuracy.run_config(base, {**values, "train.device_memory_gb": limit_gb})
    need = fit.estimate(run, run.mesh.as_dict())
    assert need["total"] <= limit_gb * GiB


def test_plan_script_writes_table_json_and_plot(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "plan.py"),
            f"--config={os.path.join(ROOT, 'configs', 'lm.py')}:smoke",
            "--devices=8",
            "--device_memory=10MB",
            "--device_kind=CPU",
            "--top=5",
            f"--out={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| 1 |" in result.stdout and "rejected because" in result.stdout
    data = json.loads((tmp_path / "plan.json").read_text())
    rows = [dict(zip(data["columns"], row)) for row in data["plans"]]
    fitting = [row for row in rows if row["fits"]]
    assert fitting and all(row["bytes_per_device"] <= 10 * 2**20 for row in fitting)
    assert any(not row["fits"] and row["reason"].startswith("needs") for row in rows)
    assert data["top"][0]["overrides"] and data["top"][0]["memory_bytes"]["total"] <= 10 * 2**20
    assert (tmp_path / "plan.png").stat().st_size > 10_000 and (tmp_path / "plan.md").exists()
