"""MeshConfig -> jax Mesh over the six named axes."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

from jaxpar.config import MESH_AXES, MeshConfig


def make_mesh(mesh_config: MeshConfig, devices: list | None = None) -> Mesh:
    """A mesh with every axis of MESH_AXES (size-1 axes included, so rules never name a missing axis).

    The product is checked against the device count first: `jax.make_mesh` would silently use a subset.
    Axes are Auto (GSPMD propagation) so model code only states sharding at a few constraint points.
    """
    devices = jax.devices() if devices is None else devices
    sizes = mesh_config.resolve(len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def describe(mesh: Mesh) -> str:
    """'data=2 fsdp=2 tensor=2' (axes of size 1 left out)."""
    parts = [f"{name}={size}" for name, size in mesh.shape.items() if size > 1]
    return " ".join(parts) or f"single device ({mesh.size})"
