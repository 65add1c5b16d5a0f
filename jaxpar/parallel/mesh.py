"""Resolved axis sizes -> a jax Mesh over the six named axes."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from jax.sharding import AxisType, Mesh

# Outermost first: pipeline stages talk least often, tensor shards most often (nearest devices).
MESH_AXES = ("pipeline", "data", "fsdp", "expert", "sequence", "tensor")


def make_mesh(sizes: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A mesh with every axis of MESH_AXES (axes missing from `sizes` get size 1, so rules never name a
    missing axis). `sizes` are resolved counts (jaxpar.config.MeshConfig.resolve turns a config's -1
    into one).

    The product is checked against the device count first: `jax.make_mesh` would silently use a subset.
    Axes are Auto (GSPMD propagation) so model code only states sharding at a few constraint points.
    """
    devices = jax.devices() if devices is None else devices
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {list(MESH_AXES)}.")
    shape = tuple(sizes.get(name, 1) for name in MESH_AXES)
    if any(size < 1 for size in shape) or math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh sizes {dict(sizes)} must be positive and multiply to the {len(devices)} devices given."
        )
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def describe(mesh: Mesh) -> str:
    """'data=2 fsdp=2 tensor=2' (axes of size 1 left out)."""
    parts = [f"{name}={size}" for name, size in mesh.shape.items() if size > 1]
    return " ".join(parts) or f"single device ({mesh.size})"
