"""Sequence parallelism in the model: loss and every gradient of jaxpar's Llama with the sequence split
over the mesh (each variant, alone and with data / fsdp / tensor / expert; linear-attention and hybrid
models with LASP-2) equal the single-device run, fp32, on packed rows. The batch goes through the same
zigzag layout the training loop applies; positions keep the true token positions, so RoPE and the loss
are unchanged. Plus the configuration checks for impossible splits.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import jax
import numpy as np
import pytest

from jaxpar.config import ConfigError, DataConfig, MeshConfig, MoEConfig, RunConfig, TrainConfig, validate_run
from jaxpar.parallel import sequence as seq
from lm_testing import (
    TINY,
    assert_grads_close,
    config_mesh,
    loss_and_grads_on,
    packed_batch,
    single_device_mesh,
)

# Configs are built inside the tests (not at import), so that before the model wiring exists these tests
# fail one by one instead of breaking the collection of the whole suite.
MODEL_OVERRIDES = {
    "softmax": {},
    "linear": dict(mixer="linear", linear_chunk=4),
    "hybrid": dict(mixer="hybrid", softmax_every=2, linear_chunk=4),  # one linear + one softmax layer
    "moe": dict(moe=MoEConfig(experts=4, top_k=2, d_ff=32)),  # dropless experts
}

# name -> (model, sequence_parallel, mesh axis sizes, model overrides, the layout's zigzag n)
CASES = {
    "ring_seq8": ("softmax", "ring", dict(sequence=8), {}, 8),
    "ring_seq2_dp2_tp2": ("softmax", "ring", dict(data=2, sequence=2, tensor=2), {}, 2),
    "ulysses_seq4_dp2": ("softmax", "ulysses", dict(data=2, sequence=4), {}, 1),
    "usp_seq4_tp2": ("softmax", "usp", dict(sequence=4, tensor=2), {}, 2),  # auto degree 2
    "allgather_seq4_fsdp2": ("softmax", "allgather", dict(fsdp=2, sequence=4), {}, 4),
    "lasp2_seq2_fsdp2_tp2": ("linear", "ring", dict(fsdp=2, sequence=2, tensor=2), {}, 1),
    "hybrid_usp_seq8": ("hybrid", "usp", dict(sequence=8), {"ulysses_degree": 2}, 4),
    "hybrid_ring_seq2_fsdp2_tp2": ("hybrid", "ring", dict(fsdp=2, sequence=2, tensor=2), {}, 2),
    "moe_ring_seq4_expert2": ("moe", "ring", dict(expert=2, sequence=4), {}, 4),
}


def tiny(**overrides):
    return dataclasses.replace(TINY, **overrides)


def mesh_config(**sizes) -> MeshConfig:
    return MeshConfig(**{"data": 1, **sizes})


def run_config(model, mesh: MeshConfig, global_batch=8, seq_len=16) -> RunConfig:
    """Every other section at its defaults; token data (TINY's 64-token vocabulary is too small for bytes)."""
    defaults = {name: cls() for name, cls in typing.get_type_hints(RunConfig).items() if name != "data"}
    data = DataConfig(source="tokens", path="unused")
    return RunConfig(
        **{
            **defaults,
            "model": model,
            "mesh": mesh,
            "data": data,
            "train": TrainConfig(global_batch=global_batch, seq_len=seq_len),
        }
    )


@functools.cache
def reference(model: str):
    loss, grads, _ = loss_and_grads_on(single_device_mesh(), tiny(**MODEL_OVERRIDES[model]), packed_batch(0))
    return loss, grads


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_grads_match_single_device(name):
    model, variant, sizes, overrides, want_zigzag = CASES[name]
    cfg = tiny(**MODEL_OVERRIDES[model], sequence_parallel=variant, **overrides)
    mesh_cfg = mesh_config(**sizes)
    mesh = config_mesh(mesh_cfg)
    batch = packed_batch(0)
    B, T = batch["inputs"].shape
    validate_run(run_config(cfg, mesh_cfg, B, T), jax.device_count())
    zigzag = cfg.zigzag_factor(dict(mesh.shape))
    assert zigzag == want_zigzag
    loss, grads, _ = loss_and_grads_on(mesh, cfg, seq.zigzag_batch(batch, zigzag))
    want_loss, want_grads = reference(model)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert_grads_close(grads, want_grads)


def test_impossible_splits_are_config_errors():
    with pytest.raises(ConfigError, match="key/value heads"):
        validate_run(run_config(tiny(sequence_parallel="ulysses"), mesh_config(sequence=8)), 8)
    with pytest.raises(ConfigError, match="cuts the sequence into 16 equal chunks"):
        validate_run(run_config(tiny(sequence_parallel="ring"), mesh_config(sequence=8), seq_len=24), 8)
    with pytest.raises(ConfigError, match="ulysses_degree=3"):
        validate_run(run_config(tiny(sequence_parallel="usp", ulysses_degree=3), mesh_config(sequence=8)), 8)
    with pytest.raises(ConfigError, match="model.sequence_parallel='tokenring' is not supported"):
        dataclasses.replace(TINY, sequence_parallel="tokenring")
    with pytest.raises(ConfigError, match="softmax_every=3 .* divide model.n_layers=2"):
        dataclasses.replace(TINY, mixer="hybrid", softmax_every=3)
    # What does fit: Ulysses over 4 (8 query, 4 KV heads), the linear model needs no zigzag.
    validate_run(run_config(tiny(sequence_parallel="ulysses"), mesh_config(data=2, sequence=4)), 8)
    validate_run(run_config(tiny(mixer="linear"), mesh_config(sequence=8), seq_len=8), 8)


@pytest.mark.parametrize("model", ["linear", "hybrid"])
def test_parameter_count_includes_linear_attention(model):
    from jaxpar.train.build import abstract_model

    cfg = tiny(**MODEL_OVERRIDES[model])
    _, params = abstract_model(cfg)
    counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert counted == cfg.n_params
    assert cfg.linear_layers == {"linear": 2, "hybrid": 1}[model]


@functools.cache
def bf16_reference(model: str):
    cfg = tiny(**MODEL_OVERRIDES[model], dtype="bfloat16")
    loss, grads, _ = loss_and_grads_on(single_device_mesh(), cfg, packed_batch(0))
    return loss, grads


@pytest.mark.parametrize(
    "model, variant",
    [
        ("softmax", "ring"),
        ("softmax", "ulysses"),
        ("softmax", "usp"),
        ("softmax", "allgather"),
        ("linear", "ring"),
    ],
)
def test_bfloat16_matches_single_device(model, variant):
    """bfloat16 compute (fp32 parameters): every variant compiles and stays within bf16 rounding of the
    single-device model (an XLA:CPU abort on bf16 reduce-scatters in the layer loop is kept out)."""
    cfg = tiny(**MODEL_OVERRIDES[model], dtype="bfloat16", sequence_parallel=variant)
    mesh = config_mesh(mesh_config(data=2, sequence=4))
    zigzag = cfg.zigzag_factor(dict(mesh.shape))
    loss, grads, _ = loss_and_grads_on(mesh, cfg, seq.zigzag_batch(packed_batch(0), zigzag))
    want_loss, want_grads = bf16_reference(model)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-4)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()
