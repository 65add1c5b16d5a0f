"""The planner's outputs: a ranked markdown table, JSON, and a plot of memory vs predicted step time."""

from __future__ import annotations

import collections
import json
import pathlib
import re

from jaxpar.plan.devices import DeviceKind
from jaxpar.plan.search import Plan, frontier

GiB = 2**30


def parse_bytes(text: str) -> int:
    """'80GB' -> 80 * 2**30 (GB and GiB both mean GiB, as device memory is quoted), '512MB', '1.5TB',
    or a plain number of GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"device memory {text!r} is not a size; write e.g. 80GB, 141GiB or 512MB.")
    value, unit = float(match.group(1)), (match.group(2) or "G").upper()
    return int(value * 2 ** {"K": 10, "M": 20, "G": 30, "T": 40}[unit])


def _memory_cells(plan: Plan) -> list[str]:
    m = plan.memory
    return [f"{m[k] / GiB:.2f}" for k in ("total", "params", "opt_state", "activations", "transient")]


def markdown(plans: list[Plan], top: int, header: str) -> str:
    """The top fitting plans as a table, then the rejections by reason."""
    fitting = [p for p in plans if p.fits][:top]
    lines = [
        header,
        "",
        "| # | mesh | remat | microbatching | offload | GiB/device | params | opt | acts | transient "
        "| step s | compute s | comm s | bubble |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rank, plan in enumerate(fitting, 1):
        micro = _micro(plan)
        offload = offload_label(plan.run.offload)
        c = plan.cost
        lines.append(
            f"| {rank} | {plan.mesh_label()} | {plan.run.model.remat} | {micro} | {offload} | "
            + " | ".join(_memory_cells(plan))
            + f" | {c.step_s:.3f} | {c.compute_s:.3f} | {c.comm_s:.3f} | {c.bubble:.2f} |"
        )
    if not fitting:
        lines.append("| - | no plan fits | | | | | | | | | | | | |")
    rejected = [p for p in plans if not p.fits]
    reasons = collections.Counter(_reason_kind(p.reason) for p in rejected)
    lines += ["", f"{len(plans)} plans: {len(plans) - len(rejected)} fit, {len(rejected)} rejected.", ""]
    if reasons:
        lines += ["| rejected because | plans | example |", "|---|---|---|"]
        examples = {}
        for p in rejected:
            examples.setdefault(_reason_kind(p.reason), p)
        for kind, count in reasons.most_common():
            ex = examples[kind]
            lines.append(f"| {kind} | {count} | {ex.mesh_label()}, remat {ex.run.model.remat}: {ex.reason} |")
    if fitting:
        lines += ["", f"Best: `{fitting[0].flags()}`"]
    return "\n".join(lines) + "\n"


def _micro(plan: Plan) -> str:
    if plan.sizes["pipeline"] > 1:
        return f"{plan.run.pipeline.schedule} M={plan.run.pipeline.microbatches}"
    return f"accum {plan.run.train.grad_accum_steps}"


def _reason_kind(reason: str) -> str:
    if reason.startswith("needs"):
        return "does not fit the device memory"
    text = reason.removeprefix("invalid: ")
    return "invalid: " + re.sub(r"[=\d].*", "", text.split(";")[0])[:60].strip()


def plot(plans: list[Plan], path: pathlib.Path, title: str, bytes_limit: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display where the planner runs
    import matplotlib.pyplot as plt

    valid = [p for p in plans if p.cost]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for fits, color, label in ((False, "#bbbbbb", "does not fit"), (True, "#4C72B0", "fits")):
        chosen = [p for p in valid if p.fits == fits]
        ax.scatter(
            [p.memory["total"] / GiB for p in chosen],
            [p.cost.step_s for p in chosen],
            s=10,
            c=color,
            label=f"{label} ({len(chosen)})",
        )
    front = frontier(valid)
    ax.plot(
        [p.memory["total"] / GiB for p in front],
        [p.cost.step_s for p in front],
        "-o",
        c="#C44E52",
        ms=4,
        label="frontier (nothing smaller and faster)",
    )
    ax.axvline(bytes_limit / GiB, c="k", ls="--", lw=1, label=f"device memory {bytes_limit / GiB:.0f} GiB")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted memory per device (GiB)")
    ax.set_ylabel("predicted step time (s, roofline)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(
    plans: list[Plan],
    out: pathlib.Path,
    spec: str,
    devices: int,
    bytes_limit: int,
    device: DeviceKind,
    top: int = 10,
) -> dict:
    """plan.json in `out`: the `top` fitting plans and the frontier in full, every valid plan ranked as a
    row (mesh, remat, microbatching, offload, bytes, step time, fits, reason), the invalid ones counted
    by reason with examples; returns the JSON written."""
    out.mkdir(parents=True, exist_ok=True)
    valid = [p for p in plans if p.cost]  # fitting first (ranked), then those that need more memory
    invalid: dict[str, dict] = {}
    for p in plans:
        if not p.cost:
            group = invalid.setdefault(_reason_kind(p.reason), {"count": 0, "examples": []})
            group["count"] += 1
            if len(group["examples"]) < 3:
                group["examples"].append({"mesh": p.sizes, "reason": p.reason})
    data = {
        "config": spec,
        "devices": devices,
        "device_memory_bytes": bytes_limit,
        "device_kind": device.__dict__,
        "top": [p.as_dict() for p in valid[:top]],
        "frontier": [p.as_dict() for p in frontier(valid)],
        "columns": [
            "mesh",
            "remat",
            "microbatching",
            "offload",
            "bytes_per_device",
            "step_s",
            "fits",
            "reason",
        ],
        "plans": [
            [
                p.mesh_label(),
                p.run.model.remat,
                _micro(p),
                offload_label(p.run.offload),
                p.memory["total"],
                round(p.cost.step_s, 6),
                p.fits,
                p.reason,
            ]
            for p in valid
        ],
        "invalid": invalid,
    }
    (out / "plan.json").write_text(json.dumps(data) + "\n")
    return data


def offload_label(offload) -> str:
    """What config.offload keeps on the host, in words ("-" for nothing)."""
    parts = [name for name, on in (("opt state", offload.optimizer_state), ("params", offload.params)) if on]
    return " + ".join(parts) or "-"
