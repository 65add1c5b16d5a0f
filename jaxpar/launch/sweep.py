"""Sweeps live next to the config they sweep: a config file's `get_sweep(arg)` returns a list of override
dicts (dotted keys), built with these helpers:

    def get_sweep(arg):
        from jaxpar.launch.sweep import product, zip_
        return {
            "lr": product({"optimizer.learning_rate": [1e-3, 3e-3, 1e-2]}),
            "lr_x_seed": product({"optimizer.learning_rate": [1e-3, 3e-3]}, {"train.seed": [0, 1, 2]}),
            "width": zip_({"model.d_model": [128, 256], "model.d_ff": [384, 768]}),
        }[arg]

`product(a, b, ...)` is every combination (the last axis varies fastest); `zip_` pairs values position by
position; `chain(...)` concatenates sweeps. Each point's workdir is named after its overrides
(`learning_rate=0.001,seed=1`), and `SWEEP_DIR/manifest.json` records every point.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from jaxpar.launch.job import LaunchError, format_value, read_json, write_json

MANIFEST = "manifest.json"
Point = dict[str, Any]


def _axes(spec: Mapping[str, Iterable[Any]]) -> list[list[Point]]:
    """{"a": [1, 2], "b": [3]} -> one list of single-key points per key."""
    axes = []
    for key, values in spec.items():
        values = list(values)
        if not values:
            raise LaunchError(f"sweep axis {key!r} has no values.")
        axes.append([{key: v} for v in values])
    return axes


def _all_axes(specs) -> list[list[Point]]:
    axes = []
    for spec in specs:
        axes += [list(spec)] if isinstance(spec, list) else _axes(spec)
    return axes


def _merged(combo) -> Point:
    point: Point = {}
    for part in combo:
        _merge(point, part)
    return point


def product(*specs: Mapping[str, Iterable[Any]] | list[Point]) -> list[Point]:
    """Cartesian product over every key of every spec; a spec may also be a list of points (a zip_)."""
    return [_merged(combo) for combo in itertools.product(*_all_axes(specs))]


def zip_(*specs: Mapping[str, Iterable[Any]] | list[Point]) -> list[Point]:
    """Position-wise: {"a": [1, 2], "b": [3, 4]} -> [{a: 1, b: 3}, {a: 2, b: 4}]; lengths must match."""
    axes = _all_axes(specs)
    lengths = {len(axis) for axis in axes}
    if len(lengths) > 1:
        raise LaunchError(f"zip_ needs axes of equal length, got lengths {sorted(lengths)}.")
    return [_merged(combo) for combo in zip(*axes)]


def chain(*sweeps: list[Point]) -> list[Point]:
    return [dict(point) for sweep in sweeps for point in sweep]


def _merge(point: Point, part: Point) -> None:
    clash = set(point) & set(part)
    if clash:
        raise LaunchError(
            f"sweep key(s) {sorted(clash)} set twice in one point; each key belongs to one axis."
        )
    point.update(part)


def _short(value: Any) -> str:
    text = format_value(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "empty"


def point_names(points: list[Point]) -> list[str]:
    """Readable, unique, filesystem-safe names: 'learning_rate=0.001,seed=1'. Keys are shortened to their
    last component unless that makes two keys of the sweep collide; a repeated point gets ",copy2", ..."""
    keys = sorted({key for point in points for key in point})
    leaf = {key: key.rsplit(".", 1)[-1] for key in keys}
    if len(set(leaf.values())) < len(keys):
        leaf = {key: key for key in keys}
    names, seen = [], {}
    for point in points:
        name = ",".join(f"{leaf[k]}={_short(v)}" for k, v in point.items()) or "default"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name},copy{seen[name]}")
    return names


def load_sweep(config_path: str, name: str) -> list[Point]:
    """Calls `get_sweep(name)` of the config file."""
    spec = importlib.util.spec_from_file_location("_jaxpar_sweep_config", os.path.abspath(config_path))
    if spec is None or not os.path.exists(config_path):
        raise LaunchError(f"config file {config_path} not found.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise LaunchError(f"{config_path} has no get_sweep(arg); define one next to get_config.")
    try:
        points = module.get_sweep(name)
    except (KeyError, ValueError) as error:
        raise LaunchError(f"{config_path}: get_sweep({name!r}) failed: {error}") from None
    if not isinstance(points, list) or not points or not all(isinstance(p, Mapping) for p in points):
        raise LaunchError(
            f"{config_path}: get_sweep({name!r}) must return a non-empty list of override dicts."
        )
    return [dict(p) for p in points]


def write_manifest(sweep_dir: str, record: dict) -> str:
    path = os.path.join(sweep_dir, MANIFEST)
    write_json(path, record)
    return path


def read_manifest(sweep_dir: str) -> dict | None:
    return read_json(os.path.join(sweep_dir, MANIFEST))
