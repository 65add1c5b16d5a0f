#!/usr/bin/env python3
"""Will it fit, and with which mesh? Rank every plan of a config on N devices before anything runs.

  python scripts/plan.py --config=configs/lm.py:llama_7b --devices=64 --device_memory=80GB \
      [--device_kind=H100] [--top=10] [--out=DIR] [--config.KEY=VALUE ...]

Enumerates meshes over every axis, remat policies, microbatching / pipeline schedules and offload
choices (jaxpar.plan.search); prints the fitting plans ranked by predicted step time (a stated
roofline, jaxpar.plan.cost) and why the others were rejected. With --out: plan.md, plan.json and
plan.png (memory vs predicted step time, the frontier marked). Nothing is allocated or compiled, so any
device count is planned on any machine (the model is traced on abstract meshes).
"""

import pathlib
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from jaxpar import machine
from jaxpar.config import ConfigError, from_config_dict
from jaxpar.launch import cli
from jaxpar.plan import devices as devices_lib, report, search

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/lm.py:llama_7b."
)
_DEVICES = flags.DEFINE_integer("devices", None, "Number of devices to plan for.")
_MEMORY = flags.DEFINE_string("device_memory", None, "Memory per device, e.g. 80GB (default: the kind's).")
_KIND = flags.DEFINE_string("device_kind", "H100", f"Roofline row: one of {list(devices_lib.DEVICE_KINDS)}.")
_TOP = flags.DEFINE_integer("top", 10, "How many fitting plans to print.")
_OUT = flags.DEFINE_string("out", None, "Folder for plan.md, plan.json and plan.png.")
flags.mark_flags_as_required(["config", "devices"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    machine.simulate_cpu_devices(1)  # tracing only: one CPU device is enough for any planned count
    try:
        run = from_config_dict(_CONFIG.value)
        device = devices_lib.device_kind(_KIND.value)
        bytes_limit = report.parse_bytes(_MEMORY.value) if _MEMORY.value else int(device.hbm_bytes)
    except (ConfigError, ValueError) as error:
        sys.exit(f"error: {error}")
    spec = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "config")
    start = time.perf_counter()
    plans = search.search(run, _DEVICES.value, bytes_limit, device)
    seconds = time.perf_counter() - start
    header = (
        f"## Plans for {spec} on {_DEVICES.value} x {device.name} with {bytes_limit / 2**30:.0f} GiB each\n\n"
        f"Predicted per-device memory (GiB) and roofline step time (s); {len(plans)} plans in "
        f"{seconds:.0f} s."
    )
    text = report.markdown(plans, _TOP.value, header)
    print(text)
    if _OUT.value:
        out = pathlib.Path(_OUT.value)
        report.write(plans, out, spec, _DEVICES.value, bytes_limit, device, _TOP.value)
        (out / "plan.md").write_text(text)
        report.plot(plans, out / "plan.png", f"{spec}, {_DEVICES.value} x {device.name}", bytes_limit)
        print(f"wrote {out}/plan.md, plan.json, plan.png")
    if not any(p.fits for p in plans):
        sys.exit(f"error: no plan of {spec} fits {_DEVICES.value} devices of {bytes_limit / 2**30:.0f} GiB.")


if __name__ == "__main__":
    cli.check_config_flags()
    app.run(main)
