"""config.offload (issue 18): the optimizer state and/or the parameters live in pinned host memory and
the training is the same math: losses, parameters and optimizer states equal to the run without offload,
step by step, on several meshes; the compiled step's outputs sit in the memory kinds the config says."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import lm
from jaxpar.config import ConfigError, OffloadConfig, validate_run
from jaxpar.parallel.mesh import make_mesh
from jaxpar.plan import accuracy
from jaxpar.train import build, fit, step as step_lib
from lm_testing import packed_batch

MESHES = {
    "dp2_fsdp2_tp2": {},
    "fsdp8": {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1},
}
# (optimizer state offloaded, remat, parameters offloaded): the first is the reference, everything on the
# device; each program's outputs must land in the memory kinds these say
VARIANTS = {
    "dp2_fsdp2_tp2": [
        (False, "save_dots", False),
        (True, "save_dots", False),
        (False, "offload", False),
        (False, "offload_names", False),  # model.remat_names' activations on the host
    ],
    "fsdp8": [(False, "save_dots", False), (True, "save_dots", True), (False, "save_dots", True)],
}


def _program(overrides, offload: bool, remat: str = "save_dots", params: bool = False):
    run = accuracy.run_config(
        lm.get_config("smoke"),
        {**overrides, "model.remat": remat, "model.remat_names": "attention,mlp_hidden", "train.seq_len": 64},
    )
    run = dataclasses.replace(run, offload=OffloadConfig(optimizer_state=offload, params=params))
    return build.build(run, make_mesh(validate_run(run, jax.device_count())))


def _kinds(tree) -> set:
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_offload_trains_identically(mesh):
    """Optimizer state on the host, remat 'offload' (save_dots' residuals on the host) and 'offload_names'
    (the named attention output and MLP hidden on the host), FSDP parameter
    shards on the host (with and without the optimizer state), against
    everything on the device: losses, the evaluation's sums, parameters and optimizer states bitwise equal
    over three steps, and the step's outputs in the memory kinds the config says."""
    variants = VARIANTS[mesh]
    programs = [_program(MESHES[mesh], opt, remat, params) for opt, remat, params in variants]
    states = [program.init() for program in programs]

    def check_kinds():
        for (opt, _, params), state in zip(variants, states):
            assert _kinds(state.opt_state) == {"pinned_host" if opt else "device"}
            assert _kinds(state.params) == {"pinned_host" if params else "device"}

    check_kinds()
    sharding = step_lib.batch_sharding(programs[0].mesh)
    for step in range(3):
        batch = jax.device_put(packed_batch(step, batch=16, length=64, vocab=256), sharding)
        with jax.set_mesh(programs[0].mesh):
            results = [program.train_step(state, batch) for program, state in zip(programs, states)]
        states = [state for state, _ in results]
        losses = [float(metrics["loss"]) for _, metrics in results]
        assert all(loss == losses[0] for loss in losses), losses
    check_kinds()  # the compiled step's outputs stay where the config puts them
    with jax.set_mesh(programs[0].mesh):
        evals = [
            np.asarray(program.eval_step(state.params, batch)) for program, state in zip(programs, states)
        ]
    assert all(np.array_equal(e, evals[0]) for e in evals), evals
    for other in states[1:]:
        for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_estimate_moves_the_optimizer_state_to_the_host():
    plain, offloaded = _program({}, False), _program({}, True)
    sizes = dict(plain.mesh.shape)
    before = fit.estimate(plain.run, sizes, plain.abstract)
    after = fit.estimate(offloaded.run, sizes, offloaded.abstract)
    assert after["host"] == before["opt_state"] > 0 and after["opt_state"] == 0
    assert after["total"] == sum(after[k] for k in fit.PARTS)
    assert after["total"] <= before["total"]


def test_estimate_moves_the_parameters_to_the_host():
    """With the parameters offloaded the device holds the unscanned leaves plus one layer's shard of the
    parameters and of the gradients during the step; the host holds all of them; the update brings them in."""
    plain, offloaded = _program({}, False), _program({}, False, params=True)
    sizes = dict(plain.mesh.shape)
    before = fit.estimate(plain.run, sizes, plain.abstract)
    after = fit.estimate(offloaded.run, sizes, offloaded.abstract)
    assert after["host"] == before["params"]
    assert 0 < after["params"] == after["grads"] < before["params"]
    assert after["host_traffic"] == 6 * before["params"] and before["host_traffic"] == 0
    assert after["total"] == sum(after[k] for k in fit.PARTS)


def test_offloaded_params_need_rematerialisation():
    run = accuracy.run_config(lm.get_config("smoke"), {"model.remat": "none"})
    run = dataclasses.replace(run, offload=OffloadConfig(params=True))
    with pytest.raises(ConfigError, match=r"offload.params=True with model.remat='none'.*model.remat='full'"):
        validate_run(run, jax.device_count())


def test_names_based_remat_offloads_what_it_names():
    """remat 'offload_names' keeps the named activations on the host: the estimate moves exactly the bytes
    'save_names' keeps beyond 'full' there; an unknown or empty name list is refused with the choices."""
    programs = {remat: _program({}, False, remat=remat) for remat in ("full", "save_names", "offload_names")}
    sizes = dict(programs["full"].mesh.shape)
    est = {remat: fit.estimate(p.run, sizes, p.abstract) for remat, p in programs.items()}
    assert est["save_names"]["activations"] > est["full"]["activations"]
    assert est["offload_names"]["activations"] == est["full"]["activations"]
    assert est["offload_names"]["host"] == est["save_names"]["activations"] - est["full"]["activations"] > 0
    with pytest.raises(ConfigError, match=r"model.remat_names.*'logits'.*qkv"):
        accuracy.run_config(lm.get_config("smoke"), {"model.remat_names": "attention,logits"})
    with pytest.raises(ConfigError, match=r"model.remat='save_names'.*empty"):
        accuracy.run_config(lm.get_config("smoke"), {"model.remat": "save_names", "model.remat_names": ""})
