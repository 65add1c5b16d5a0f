"""Shared pieces for LM tests: a tiny model that every tested mesh can shard, and packed batches."""

import functools

import jax
import numpy as np

from jaxpar.config import MeshConfig, ModelConfig, OptimizerConfig
from jaxpar.parallel.mesh import make_mesh
from jaxpar.train import build as build_lib, optimizer as optimizer_lib, step as step_lib

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, d_ff=64)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=2)

# Every strategy this project implements, alone and combined, on 8 devices.
MESHES = {
    "dp8": MeshConfig(data=8),
    "fsdp8": MeshConfig(data=1, fsdp=8),
    "tp4": MeshConfig(data=2, tensor=4),
    "dp2_fsdp2_tp2": MeshConfig(data=2, fsdp=2, tensor=2),
    "fsdp4_tp2": MeshConfig(data=1, fsdp=4, tensor=2),
}


def config_mesh(mesh_config: MeshConfig, devices=None):
    """The mesh of a MeshConfig on `devices` (default: all)."""
    devices = jax.devices() if devices is None else devices
    return make_mesh(mesh_config.resolve(len(devices)), devices)


def single_device_mesh():
    return make_mesh({}, jax.devices()[:1])


def packed_batch(seed: int, batch: int = 8, length: int = 16, vocab: int = 64) -> dict[str, np.ndarray]:
    """Random tokens in rows packed with 1-3 documents and a padded tail."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(2, length - 1), size=rng.integers(1, 3), replace=False))
        bounds = [0, *cuts, length - rng.integers(0, 3)]
        for segment, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            segment_ids[row, lo:hi] = segment
            positions[row, lo:hi] = np.arange(hi - lo)
    tokens = rng.integers(1, vocab, (batch, length + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids,
        "positions": positions,
    }


def loss_and_grads_on(mesh, model_cfg, batch, grad_accum_steps=1):
    """(loss, grads as numpy, grads as placed) of the jitted train-step math on `mesh`, from seed 0."""
    tx = optimizer_lib.make_optimizer(OPT, 20)  # the optimizer's schedule does not enter the gradients
    graphdef, state, shardings = build_lib.init_state(model_cfg, tx, mesh, seed=0)
    fn = functools.partial(
        step_lib.loss_and_grads,
        graphdef=graphdef,
        grad_accum_steps=grad_accum_steps,
        grad_shardings=shardings.params,
    )
    with jax.set_mesh(mesh):
        jitted = jax.jit(
            lambda p, b: fn(p, batch=b)[:2], in_shardings=(shardings.params, step_lib.batch_sharding(mesh))
        )
        loss, grads = jitted(state.params, jax.device_put(batch, step_lib.batch_sharding(mesh)))
    return float(loss), jax.tree.map(np.asarray, grads), grads


def assert_grads_close(grads, expected):
    """Every gradient leaf within 1e-5 of the largest magnitude of its expected value (fp32 parity)."""
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert len(flat) == len(jax.tree.leaves(expected))
    for (path, got), want in zip(flat, jax.tree.leaves(expected)):
        want = np.asarray(want)
        np.testing.assert_allclose(
            np.asarray(got),
            want,
            rtol=0,
            atol=1e-5 * np.abs(want).max() + 1e-9,
            err_msg=jax.tree_util.keystr(path),
        )
