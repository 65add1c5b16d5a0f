"""config.offload.optimizer_state (issue 18): the optimizer state lives in pinned host memory and the
training is the same math: losses, parameters and optimizer states equal to the run without offload,
step by step, on several meshes; the compiled step's outputs sit in the memory kinds the config says."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import lm
from jaxpar.config import OffloadConfig, validate_run
from jaxpar.parallel.mesh import make_mesh
from jaxpar.plan import accuracy
from jaxpar.train import build, fit, step as step_lib
from lm_testing import packed_batch

MESHES = {
    "dp2_fsdp2_tp2": {},
    "fsdp8": {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1},
}


def _program(overrides, offload: bool, remat: str = "save_dots"):
    run = accuracy.run_config(
        lm.get_config("smoke"), {**overrides, "model.remat": remat, "train.seq_len": 64}
    )
    run = dataclasses.replace(run, offload=OffloadConfig(optimizer_state=offload))
    return build.build(run, make_mesh(validate_run(run, jax.device_count())))


def _kinds(tree) -> set:
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_offload_trains_identically(mesh):
    """Optimizer state on the host, and remat 'offload' (save_dots' residuals on the host), against
    save_dots with everything on the device: losses, parameters and optimizer states bitwise equal over
    three steps."""
    programs = [
        _program(MESHES[mesh], False),
        _program(MESHES[mesh], True),
        _program(MESHES[mesh], False, remat="offload"),
    ]
    states = [program.init() for program in programs]
    assert _kinds(states[1].opt_state) == {"pinned_host"} and _kinds(states[1].params) == {"device"}
    assert _kinds(states[0].opt_state) == {"device"} == _kinds(states[2].opt_state)
    sharding = step_lib.batch_sharding(programs[0].mesh)
    for step in range(3):
        batch = jax.device_put(packed_batch(step, batch=16, length=64, vocab=256), sharding)
        with jax.set_mesh(programs[0].mesh):
            results = [program.train_step(state, batch) for program, state in zip(programs, states)]
        states = [state for state, _ in results]
        losses = [float(metrics["loss"]) for _, metrics in results]
        assert losses[1] == losses[0] and losses[2] == losses[0], losses
    assert _kinds(states[1].opt_state) == {"pinned_host"}  # stays on the host across steps
    for other in states[1:]:
        for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compiled_outputs_are_in_the_configured_memory_kinds():
    for offload in (False, True):
        program = _program({}, offload)
        state_out, _ = program.compile().output_shardings
        opt_kinds = {s.memory_kind for s in jax.tree.leaves(state_out.opt_state)}
        assert opt_kinds == {"pinned_host" if offload else "device"}
        assert {s.memory_kind for s in jax.tree.leaves(state_out.params)} == {"device"}


def test_estimate_moves_the_optimizer_state_to_the_host():
    plain, offloaded = _program({}, False), _program({}, True)
    sizes = dict(plain.mesh.shape)
    before = fit.estimate(plain.run, sizes, plain.abstract)
    after = fit.estimate(offloaded.run, sizes, offloaded.abstract)
    assert after["host"] == before["opt_state"] > 0 and after["opt_state"] == 0
    assert after["total"] == sum(after[k] for k in fit.PARTS)
    assert after["total"] <= before["total"]
