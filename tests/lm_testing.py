"""Shared pieces for LM tests: a tiny model that every tested mesh can shard, and packed batches."""

import jax
import numpy as np

from jaxpar.config import MeshConfig, ModelConfig, OptimizerConfig
from jaxpar.parallel.mesh import make_mesh

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


def single_device_mesh():
    return make_mesh(MeshConfig(data=1), jax.devices()[:1])


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
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids, "positions": positions}
