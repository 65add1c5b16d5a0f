"""Every parallel strategy is the same math: loss, every gradient and 20 steps of training on 8 devices
equal the single-device run (fp32)."""

import functools

import jax
import numpy as np
import pytest

from jaxpar.train import build as build_lib, optimizer as optimizer_lib, step as step_lib
from lm_testing import (
    MESHES,
    OPT,
    TINY,
    assert_grads_close,
    config_mesh,
    loss_and_grads_on,
    packed_batch,
    single_device_mesh,
)

STEPS = 20


def train_losses_on(mesh, model_cfg):
    tx = optimizer_lib.make_optimizer(OPT, STEPS)
    schedule = optimizer_lib.learning_rate_schedule(OPT, STEPS)
    graphdef, state, shardings = build_lib.init_state(model_cfg, tx, mesh, seed=0)
    losses = []
    with jax.set_mesh(mesh):
        step = step_lib.jit_train_step(
            step_lib.make_train_step(graphdef, tx, schedule, 1, shardings.params), mesh, shardings
        )
        for i in range(STEPS):
            batch = jax.device_put(packed_batch(100 + i % 2), step_lib.batch_sharding(mesh))  # learnable
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return np.array(losses)


@functools.cache
def reference(tie_embeddings=False):
    cfg = TINY.__class__(**{**TINY.__dict__, "tie_embeddings": tie_embeddings})
    loss, grads, _ = loss_and_grads_on(single_device_mesh(), cfg, packed_batch(0))
    return cfg, loss, grads


@pytest.mark.parametrize("tie_embeddings", [False, True])
@pytest.mark.parametrize("name", sorted(MESHES))
def test_loss_and_grads_match_single_device(name, tie_embeddings):
    cfg, want_loss, want_grads = reference(tie_embeddings)
    loss, grads, device_grads = loss_and_grads_on(config_mesh(MESHES[name]), cfg, packed_batch(0))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert_grads_close(grads, want_grads)
    # ZeRO-3 / Megatron: gradients come out sharded exactly like their parameters.
    if name == "fsdp8":
        grad = device_grads["blocks"]["mlp"]["w_up"][...]
        assert grad.sharding.shard_shape(grad.shape) == (TINY.n_layers, TINY.d_model // 8, TINY.d_ff)


def test_gradient_accumulation_is_exact():
    cfg, want_loss, want_grads = reference()
    loss, grads, _ = loss_and_grads_on(
        config_mesh(MESHES["dp2_fsdp2_tp2"]), cfg, packed_batch(0), grad_accum_steps=2
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert_grads_close(grads, want_grads)


@pytest.mark.parametrize("name", ["dp8", "fsdp8", "tp4", "dp2_fsdp2_tp2"])
def test_twenty_training_steps_match_single_device(name):
    want = train_losses_on(single_device_mesh(), TINY)
    got = train_losses_on(config_mesh(MESHES[name]), TINY)
    assert want[-1] < want[0] - 0.5, f"the reference did not train: {want}"
    np.testing.assert_allclose(got, want, rtol=2e-5)
