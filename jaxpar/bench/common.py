"""What every benchmark does the same way: results.json and README.md in its output folder, figures, a
config file read as the --config flag reads it, and measurements that need their own device count, run in
a child process (the count is fixed when jax starts)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable

from ml_collections import ConfigDict

RESULTS = "results.json"
README = "README.md"


def read_results(out: str | pathlib.Path, missing_ok: bool = False) -> dict:
    """`out`/results.json; {} where there is none yet and `missing_ok` (a benchmark that adds to it)."""
    path = pathlib.Path(out) / RESULTS
    if missing_ok and not path.exists():
        return {}
    return json.loads(path.read_text())


def write_results(out: str | pathlib.Path, results: dict, default: Callable | None = None) -> pathlib.Path:
    """`out`/results.json (folder made if needed); `default` turns what json cannot write into what it can."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(results, indent=1, default=default) + "\n")
    return out / RESULTS


def write_readme(out: str | pathlib.Path, text: str) -> pathlib.Path:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / README).write_text(text)
    return out / README


def pyplot():
    """matplotlib.pyplot drawing into files only (no display on the machines benchmarks run on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | pathlib.Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def load_config_dict(spec: str) -> ConfigDict:
    """'configs/lm.py:llama_7b' -> that file's get_config('llama_7b') (get_config() without ':arg'), the way
    --config reads it: the path is relative to the working directory."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def run_in_child(module: str, args: list, cpu_devices: int):
    """`python -m module` on `cpu_devices` simulated CPU devices, given `args` as JSON; what the child's
    `child_main` printed. The rest of XLA_FLAGS is passed on."""
    xla_flags = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join([*xla_flags, f"--xla_force_host_platform_device_count={cpu_devices}"]),
    )
    result = subprocess.run(
        [sys.executable, "-m", module, json.dumps(args)],
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_main(measure: Callable) -> None:
    """The child side of `run_in_child`: `measure(*args)`, printed as JSON on the last line of stdout."""
    print(json.dumps(measure(*json.loads(sys.argv[1]))))
