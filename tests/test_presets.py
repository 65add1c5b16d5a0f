"""The real-size presets validate for their target cluster and lower for this machine's 8 devices from
abstract inputs only (nothing allocated); remat policies and dtypes keep the math."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm
from jaxpar.config import MeshConfig, from_config_dict, validate_run
from jaxpar.train import build as build_lib, optimizer as optimizer_lib, step as step_lib
from lm_testing import OPT, TINY, config_mesh, packed_batch, single_device_mesh

REAL = {"llama_1b": 64, "llama_7b": 64, "mixtral_8x7b": 64}


@pytest.mark.parametrize("preset", sorted(REAL))
def test_real_presets_validate_for_their_cluster(preset):
    sizes = validate_run(from_config_dict(lm.get_config(preset)), REAL[preset])
    assert np.prod(list(sizes.values())) == REAL[preset]


@pytest.mark.parametrize(
    "preset, mesh",
    [
        ("llama_1b", MeshConfig(data=1, fsdp=8)),
        ("llama_7b", MeshConfig(data=1, fsdp=2, tensor=4)),
        ("mixtral_8x7b", MeshConfig(data=1, fsdp=1, expert=8)),
    ],
)
def test_real_presets_lower_abstractly(preset, mesh):
    run = from_config_dict(lm.get_config(preset))
    run = dataclasses.replace(
        run, mesh=mesh, train=dataclasses.replace(run.train, global_batch=8, seq_len=512)
    )
    validate_run(run, 8)
    mesh = config_mesh(run.mesh)
    tx = optimizer_lib.make_optimizer(run.optimizer, run.train.steps)
    graphdef, abstract, shardings = build_lib.abstract_state(run.model, tx, mesh)
    step = step_lib.make_train_step(
        graphdef, tx, optimizer_lib.learning_rate_schedule(run.optimizer, 10), 1, shardings.params
    )
    batch = {
        k: jax.ShapeDtypeStruct((8, 512), jnp.int32, sharding=step_lib.batch_sharding(mesh))
        for k in step_lib.BATCH_KEYS
    }
    with jax.set_mesh(mesh):
        lowered = step_lib.jit_train_step(step, mesh, shardings).lower(abstract, batch)
    assert "stablehlo." in lowered.as_text()
    trained = [
        x
        for path, x in jax.tree_util.tree_flatten_with_path(abstract.params)[0]
        if "router_bias" not in jax.tree_util.keystr(path)
    ]  # moved by load statistics, not trained
    assert sum(int(np.prod(x.shape)) for x in trained) == run.model.n_params


def tiny_loss_and_grads(cfg):
    tx = optimizer_lib.make_optimizer(OPT, 10)
    graphdef, state, _ = build_lib.init_state(cfg, tx, single_device_mesh(), seed=0)
    loss, grads, _, _ = jax.jit(lambda p, b: step_lib.loss_and_grads(p, graphdef, b))(
        state.params, packed_batch(0)
    )
    return float(loss), grads


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_policies_keep_the_math(remat):
    want_loss, want_grads = tiny_loss_and_grads(TINY)
    loss, grads = tiny_loss_and_grads(dataclasses.replace(TINY, remat=remat))
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=0, atol=1e-6 * float(np.abs(b).max()) + 1e-9
        )


def test_bfloat16_compute_is_close_to_float32():
    want_loss, _ = tiny_loss_and_grads(TINY)
    loss, grads = tiny_loss_and_grads(dataclasses.replace(TINY, dtype="bfloat16"))
    assert loss == pytest.approx(want_loss, rel=2e-2)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # parameters stay float32
    loss_bf16_params, grads = tiny_loss_and_grads(
        dataclasses.replace(TINY, dtype="bfloat16", param_dtype="bfloat16")
    )
    assert loss_bf16_params == pytest.approx(want_loss, rel=2e-2)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads) if g.ndim > 1)
