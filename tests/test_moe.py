"""Mixture of experts: expert parallelism is the same math as one device, dropping follows an explicit
reference, auxiliary losses follow their formulas, and skewed routing loses nothing when dropless."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.config import MeshConfig, MoEConfig
from jaxpar.models import moe as moe_lib
from jaxpar.parallel import moe as dispatch
from jaxpar.train import build as build_lib, optimizer as optimizer_lib, step as step_lib
from lm_testing import OPT, TINY, assert_grads_close, config_mesh, packed_batch, single_device_mesh

MOE_TINY = dataclasses.replace(TINY, n_heads=4, n_kv_heads=2, moe=MoEConfig(experts=8, top_k=2, d_ff=32))


def loss_and_grads(model_cfg, mesh):
    tx = optimizer_lib.make_optimizer(OPT, 10)
    graphdef, state, shardings = build_lib.init_state(model_cfg, tx, mesh, seed=0)
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda p, b: step_lib.loss_and_grads(p, graphdef, b, 1, shardings.params))
        loss, grads, _, stats = fn(
            state.params, jax.device_put(packed_batch(0), step_lib.batch_sharding(mesh))
        )
    return float(loss), jax.tree.map(np.asarray, grads), jax.tree.map(np.asarray, stats)


@functools.cache
def reference(model_cfg):
    return loss_and_grads(model_cfg, single_device_mesh())


@pytest.mark.parametrize(
    "mesh_config, capacity_factor, shared",
    [
        (MeshConfig(data=1, expert=8), 0.0, 0),
        (MeshConfig(data=2, expert=4), 0.0, 1),
        (MeshConfig(data=4, expert=2), 0.0, 0),
        (MeshConfig(data=2, expert=2, tensor=2), 0.0, 0),
        (MeshConfig(data=1, fsdp=2, expert=4), 0.0, 0),
        (MeshConfig(data=2, expert=4), 8.0, 0),  # capacity large enough that nothing drops
    ],
    ids=["ep8", "dp2_ep4_shared", "dp4_ep2", "dp2_ep2_tp2", "fsdp2_ep4", "ep4_capacity"],
)
def test_expert_parallel_matches_single_device(mesh_config, capacity_factor, shared):
    cfg = dataclasses.replace(
        MOE_TINY,
        moe=dataclasses.replace(MOE_TINY.moe, capacity_factor=capacity_factor, shared_experts=shared),
    )
    want_loss, want_grads, want_stats = reference(cfg)
    loss, grads, stats = loss_and_grads(cfg, config_mesh(mesh_config))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert_grads_close(grads, want_grads)
    for key in ("aux_loss", "z_loss", "tokens_per_expert"):
        np.testing.assert_allclose(stats[key], want_stats[key], rtol=1e-5, err_msg=key)
    assert np.all(stats["dropped_fraction"] == 0)


def test_dense_and_moe_layers_mixed_match_single_device():
    """One dense layer first, then groups of (dense, MoE) (model.moe.first_dense=1, every=2), a gated shared
    expert: expert x tensor parallel equals one device; statistics come from the MoE layers only."""
    moe = dataclasses.replace(MOE_TINY.moe, first_dense=1, every=2, shared_experts=1, shared_gate=True)
    cfg = dataclasses.replace(MOE_TINY, n_layers=5, moe=moe)
    want_loss, want_grads, want_stats = reference(cfg)
    loss, grads, stats = loss_and_grads(cfg, config_mesh(MeshConfig(data=2, expert=2, tensor=2)))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert_grads_close(grads, want_grads)
    assert stats["tokens_per_expert"].shape == (2, 8)  # layers 2 and 4
    np.testing.assert_allclose(stats["aux_loss"], want_stats["aux_loss"], rtol=1e-5)
    assert set(grads) == {"blocks", "first", "embed", "final_norm", "unembed"}
    assert set(grads["blocks"]) == {"inner", "last"} and "shared_gate" in grads["blocks"]["last"]


def numpy_expert(x_D, w):
    gate, up, down = w
    h = x_D @ gate
    return (h / (1 + np.exp(-h)) * (x_D @ up)) @ down


def numpy_moe(x_ND, expert_NK, weight_NK, weights, capacity=None):
    """The layer written as loops: choice-major priority, then token order; over capacity drops."""
    N, K = expert_NK.shape
    fill = np.zeros(weights[0].shape[0], int)
    kept = np.zeros((N, K), bool)
    for k in range(K):
        for n in range(N):
            e = expert_NK[n, k]
            if capacity is None or fill[e] < capacity:
                kept[n, k] = True
                fill[e] += 1
    y = np.zeros_like(x_ND)
    for n in range(N):
        for k in range(K):
            if kept[n, k]:
                e = expert_NK[n, k]
                y[n] += weight_NK[n, k] * numpy_expert(x_ND[n], [w[e] for w in weights])
    return y, kept


def random_layer(seed, N=24, D=8, E=4, F=6, skew=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    router = rng.normal(size=(D, E)).astype(np.float32)
    if skew is not None:  # every token's logit for expert `skew` dominates
        x[:, 0] = np.abs(x[:, 0]) + 1.0
        router[0, skew] = 100.0
    weights = [rng.normal(size=s).astype(np.float32) * 0.3 for s in ((E, D, F), (E, D, F), (E, F, D))]
    return x, router, weights


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.5])
def test_dropped_tokens_match_explicit_reference(capacity_factor):
    x, router, weights = random_layer(1)
    cfg = MoEConfig(experts=4, top_k=2, capacity_factor=capacity_factor)
    y, stats = moe_lib.moe_local(
        jnp.asarray(x), jnp.asarray(router), jnp.zeros(4), *map(jnp.asarray, weights), cfg=cfg
    )
    expert_NK, weight_NK, _ = moe_lib.route(jnp.asarray(x) @ jnp.asarray(router), jnp.zeros(4), cfg)
    want_y, kept = numpy_moe(
        x, np.asarray(expert_NK), np.asarray(weight_NK), weights, capacity=moe_lib.capacity(cfg, x.shape[0])
    )
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(stats["dropped_fraction"]), 1 - kept.mean(), rtol=1e-6)
    if capacity_factor < 1:
        assert not kept.all()


def test_capacity_priority_is_choice_major():
    expert_NK = jnp.array([[0, 1], [1, 0], [0, 1]])
    # first choices: t0->e0 slot 0, t1->e1 slot 0, t2->e0 slot 1; then second choices continue each count
    np.testing.assert_array_equal(dispatch.capacity_positions(expert_NK, 2), [[0, 1], [0, 2], [1, 2]])


@pytest.mark.parametrize("ep", [1, 8])
def test_dropless_skewed_routing_loses_no_token(ep):
    """All tokens choose expert 2 first: the dropless path must still process every assignment."""
    x, router, weights = random_layer(2, N=16 * ep, E=8, skew=2)
    cfg = MoEConfig(experts=8, top_k=2, capacity_factor=0.0)
    expert_NK, weight_NK, _ = moe_lib.route(jnp.asarray(x) @ jnp.asarray(router), jnp.zeros(8), cfg)
    assert np.all(np.asarray(expert_NK)[:, 0] == 2)
    want_y, _ = numpy_moe(x, np.asarray(expert_NK), np.asarray(weight_NK), weights)
    args = (jnp.asarray(x), jnp.asarray(router), jnp.zeros(8), *map(jnp.asarray, weights))
    if ep == 1:
        y, stats = moe_lib.moe_local(*args, cfg=cfg)
    else:
        mesh = config_mesh(MeshConfig(data=1, expert=ep))
        P = jax.sharding.PartitionSpec
        layer = functools.partial(moe_lib.moe_local, cfg=cfg, expert_axis="expert", token_axes=("expert",))
        y, stats = jax.jit(
            jax.shard_map(
                layer,
                mesh=mesh,
                in_specs=(P("expert"), P(), P(), P("expert"), P("expert"), P("expert")),
                out_specs=(P("expert"), P()),
            )
        )(*args)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)
    assert float(stats["tokens_per_expert"][2]) == x.shape[0]
    assert float(stats["dropped_fraction"]) == 0


def test_auxiliary_losses_follow_their_formulas():
    logits = np.array([[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    cfg = MoEConfig(experts=4, top_k=1)
    expert_NK, _, scores = moe_lib.route(jnp.asarray(logits), jnp.zeros(4), cfg)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(scores), probs, rtol=1e-6)
    counts = np.bincount(np.asarray(expert_NK).ravel(), minlength=4).astype(np.float32)
    want_aux = 4 * np.sum(counts / counts.sum() * probs.mean(0))
    got_aux = moe_lib.load_balancing_loss(jnp.asarray(counts), jnp.asarray(probs.mean(0)))
    np.testing.assert_allclose(float(got_aux), want_aux, rtol=1e-6)
    want_z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    np.testing.assert_allclose(float(moe_lib.router_z_loss(jnp.asarray(logits))), want_z, rtol=1e-6)
    uniform = moe_lib.load_balancing_loss(jnp.full(4, 5.0), jnp.full(4, 0.25))
    np.testing.assert_allclose(float(uniform), 1.0, rtol=1e-6)


def test_sigmoid_router_and_bias_only_change_selection():
    logits = jnp.array([[0.0, 1.0, 2.0]])
    cfg = MoEConfig(experts=3, top_k=2, router="sigmoid")
    expert, weight, _ = moe_lib.route(logits, jnp.array([5.0, 0.0, 0.0]), cfg)
    # The bias pulls expert 0 into the top 2 (unbiased, experts 1 and 2 would win) ...
    chosen = dict(zip(np.asarray(expert[0]).tolist(), np.asarray(weight[0]).tolist()))
    assert set(chosen) == {0, 2}
    # ... but the weights are the unbiased sigmoid scores, normalised over the chosen experts.
    scores = 1 / (1 + np.exp(-np.array([0.0, 2.0])))
    np.testing.assert_allclose([chosen[0], chosen[2]], scores / scores.sum(), rtol=1e-6)


def test_router_bias_moves_toward_balance():
    params = {"moe": {"router_bias": jnp.zeros((2, 3))}, "w": jnp.ones(3)}
    load = jnp.array([[10.0, 5.0, 0.0], [5.0, 5.0, 5.0]])
    new = step_lib.rebalance_router_bias(params, load, 0.1)
    np.testing.assert_allclose(np.asarray(new["moe"]["router_bias"]), [[-0.1, 0.0, 0.1], [0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(new["w"]), np.ones(3))
