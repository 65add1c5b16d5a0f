"""Pipeline parallelism is the same math: for every schedule, the pipelined loss and every gradient
equal the single-device model (fp32), and 10 training steps give the same losses; config errors are
clear.

Which part of the P x V x M grid runs here, and why it covers the grid. The executor is one program
whose structure depends on the schedule family (fused or split backward), on P (devices on the
pipeline axis), on V (a ring instead of a line of ppermutes, chunk indexing) and on the layers per chunk
(the inner layer scan); M only changes the table, which the program reads as data (a scan over ticks).
The tables and their lowering to the executor's index arrays are checked for the FULL grid (every
schedule, P in {2, 4}, V in {1, 2}, M in {P, 2P, 4P}, fused or split backward) in
test_pipeline_schedules.py, by running them
symbolically: every F, B and W reads the tensor of its own microbatch from the right stage. Here each
schedule runs with P = 2 and P = 4, every M in {P, 2P, 4P} appears, gpipe and interleaved run with
V = 2, each combined with data and/or tensor (and fsdp once) on 8 simulated devices, plus a split
backward outside zero_bubble, tied
embeddings, full remat, 2 layers per chunk and parameters stored split over the pipeline axis. Each
case is one compile (~5-10 s on 2 cores), so the whole grid (30 compiles) would not fit the test
budget; the subset exercises every code path of the executor.
"""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

from jaxpar.config import MESH_AXES, ConfigError, ModelConfig, MoEConfig, PipelineConfig
from jaxpar.train import build as build_lib, optimizer as optimizer_lib, step as step_lib
from jaxpar.train.pipeline import pipelined_loss_and_grads
from lm_testing import OPT, assert_grads_close, packed_batch, single_device_mesh

# LLVM's expensive passes double the compile time of the (large) pipelined program on CPU and do not
# change the HLO numerics being compared.
FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}
STEPS = 10
LENGTH = 16
ROWS = 32  # every case's M * data * fsdp divides it, so the reference compiles once per model


@dataclasses.dataclass(frozen=True)
class Case:
    schedule: str
    P: int
    V: int
    M: int
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    layers_per_chunk: int = 1
    tie_embeddings: bool = False
    remat: str = "none"
    split_backward: bool = False

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=64,
            d_model=32,
            n_layers=self.P * self.V * self.layers_per_chunk,
            n_heads=4,
            n_kv_heads=2,
            head_dim=8,
            d_ff=64,
            tie_embeddings=self.tie_embeddings,
            remat=self.remat,
        )

    @property
    def pipeline(self) -> PipelineConfig:
        return PipelineConfig(self.schedule, self.M, self.V, self.split_backward)


CASES = {
    "gpipe_p2_m2_dp2_tp2": Case("gpipe", 2, 1, 2, data=2, tensor=2),
    "gpipe_p4_v2_m16_dp2": Case("gpipe", 4, 2, 16, data=2),
    "1f1b_p2_m4_dp2_tp2_tied_2layers": Case(
        "1f1b", 2, 1, 4, data=2, tensor=2, layers_per_chunk=2, tie_embeddings=True
    ),
    "1f1b_p4_m4_dp2": Case("1f1b", 4, 1, 4, data=2),
    "interleaved_p2_v2_m8_dp2_tp2": Case("interleaved_1f1b", 2, 2, 8, data=2, tensor=2),
    "interleaved_p4_v2_m8_tp2": Case("interleaved_1f1b", 4, 2, 8, tensor=2),
    "interleaved_p2_v2_m4_split_dp4": Case("interleaved_1f1b", 2, 2, 4, data=4, split_backward=True),
    "zero_bubble_p2_m2_fsdp2_tp2_remat": Case(
        "zero_bubble", 2, 1, 2, fsdp=2, tensor=2, layers_per_chunk=2, remat="full"
    ),
    "zero_bubble_p4_m16_dp2_tied": Case("zero_bubble", 4, 1, 16, data=2, tie_embeddings=True),
}
TRAINED = ["1f1b_p2_m4_dp2_tp2_tied_2layers", "zero_bubble_p4_m16_dp2_tied", "interleaved_p4_v2_m8_tp2"]


def pipeline_mesh(case: Case):
    sizes = dict(pipeline=case.P, data=case.data, fsdp=case.fsdp, expert=1, sequence=1, tensor=case.tensor)
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    assert int(np.prod(shape)) == 8, f"{case} should use all 8 devices"
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@functools.cache
def reference_setup(model: ModelConfig):
    """(mesh, optimizer, parameters, jitted loss-and-grads) of the single-device run every case is
    compared with; the pipelined runs start from these same parameters."""
    mesh = single_device_mesh()
    tx = optimizer_lib.make_optimizer(OPT, STEPS)
    graphdef, state, shardings = build_lib.init_state(model, tx, mesh, seed=0)

    def fn(params, batch):
        return step_lib.loss_and_grads(params, graphdef, batch, 1, shardings.params)[:2]

    with jax.set_mesh(mesh):
        grads_fn = jax.jit(fn, compiler_options=FAST_COMPILE)
    return mesh, tx, state.params, grads_fn


@functools.cache
def pipelined_setup(name: str):
    case = CASES[name]
    mesh = pipeline_mesh(case)
    _, tx, ref_params, _ = reference_setup(case.model)
    graphdef, _, shardings = build_lib.abstract_state(case.model, tx, mesh)
    param_shardings = shardings.params  # the rules store the layers split over the pipeline axis
    params = jax.device_put(ref_params, param_shardings)
    batch_sharding = step_lib.batch_sharding(mesh)

    def fn(params, batch):
        return pipelined_loss_and_grads(
            params, graphdef, batch, mesh=mesh, pipeline_cfg=case.pipeline, grad_shardings=param_shardings
        )[:2]

    with jax.set_mesh(mesh):
        grads_fn = jax.jit(fn, in_shardings=(param_shardings, batch_sharding), compiler_options=FAST_COMPILE)
    return mesh, tx, params, grads_fn, batch_sharding, param_shardings


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_every_gradient_match_single_device(name):
    case = CASES[name]
    batch = packed_batch(0, batch=ROWS, length=LENGTH)
    ref_mesh, _, ref_params, ref_fn = reference_setup(case.model)
    with jax.set_mesh(ref_mesh):
        want_loss, want_grads = ref_fn(ref_params, batch)
    mesh, _, params, grads_fn, batch_sharding, param_shardings = pipelined_setup(name)
    with jax.set_mesh(mesh):
        loss, grads = grads_fn(params, jax.device_put(batch, batch_sharding))
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    assert_grads_close(grads, want_grads)
    # Gradients come out in their parameters' layout (e.g. the layers split over the pipeline axis).
    for grad, sharding in zip(jax.tree.leaves(grads), jax.tree.leaves(param_shardings)):
        assert grad.sharding.is_equivalent_to(sharding, grad.ndim)
    w_up, embed = grads["blocks"]["mlp"]["w_up"][...], grads["embed"][...]
    assert w_up.sharding.shard_shape(w_up.shape)[0] == case.model.n_layers // case.P
    assert embed.sharding.shard_shape(embed.shape)[0] == case.model.vocab_size // case.tensor


def train(params, tx, grads_fn, mesh, batch_sharding):
    update = jax.jit(lambda g, o, p: tx.update(g, o, p))
    opt_state = jax.jit(tx.init)(params)
    losses = []
    with jax.set_mesh(mesh):
        for i in range(STEPS):
            batch = jax.device_put(packed_batch(100 + i % 2, batch=ROWS, length=LENGTH), batch_sharding)
            loss, grads = grads_fn(params, batch)
            updates, opt_state = update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            losses.append(float(loss))
    return np.array(losses)


@pytest.mark.parametrize("name", TRAINED)
def test_ten_training_steps_match_single_device(name):
    case = CASES[name]
    ref_mesh, tx, ref_params, ref_fn = reference_setup(case.model)
    want = train(ref_params, tx, ref_fn, ref_mesh, step_lib.batch_sharding(ref_mesh))
    mesh, tx, params, grads_fn, batch_sharding, _ = pipelined_setup(name)
    got = train(params, tx, grads_fn, mesh, batch_sharding)
    assert want[-1] < want[0] - 0.2, f"the reference did not train: {want}"
    np.testing.assert_allclose(got, want, rtol=2e-5)


# --- config errors ----------------------------------------------------------------------------------

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
MESH = {"pipeline": 2, "data": 2, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 2}


@pytest.mark.parametrize(
    "pipeline_cfg,model,mesh,batch,match",
    [
        (
            PipelineConfig("1f1b", 4),
            dataclasses.replace(MODEL, n_layers=3),
            MESH,
            16,
            r"model.n_layers=3 is not divisible by mesh.pipeline\*pipeline.virtual_stages=2\*1",
        ),
        (
            PipelineConfig("interleaved_1f1b", 4, 2),
            dataclasses.replace(MODEL, n_layers=6),
            MESH,
            16,
            r"n_layers=6 is not divisible by .*=2\*2=4",
        ),
        (PipelineConfig("1f1b", 1), MODEL, MESH, 16, r"pipeline.microbatches=1 < mesh.pipeline=2"),
        (PipelineConfig("zero_bubble", 1), MODEL, MESH, 16, r"microbatches=1 < mesh.pipeline=2"),
        (PipelineConfig("interleaved_1f1b", 3, 2), MODEL, MESH, 12, r"not a multiple of mesh.pipeline=2"),
        (
            PipelineConfig("gpipe", 3),
            MODEL,
            MESH,
            16,
            r"global_batch=16 is not divisible by pipeline.microbatches=3",
        ),
        (PipelineConfig("gpipe", 4), MODEL, MESH, 4, r"not divisible by mesh.data\*mesh.fsdp=2"),
        (
            PipelineConfig("gpipe", 2),
            dataclasses.replace(MODEL, vocab_size=66),
            MESH,
            16,
            r"vocab_size=66 is not divisible by mesh.pipeline\*mesh.tensor=4",
        ),
        (
            PipelineConfig("gpipe", 2),
            dataclasses.replace(MODEL, moe=MoEConfig(experts=4)),
            MESH,
            16,
            "dense blocks",
        ),
    ],
)
def test_config_errors_are_clear(pipeline_cfg, model, mesh, batch, match):
    with pytest.raises(ConfigError, match=match):
        pipeline_cfg.validate(model, mesh, batch)


def test_config_rejects_unknown_schedule_and_misused_virtual_stages():
    with pytest.raises(ConfigError, match=r"pipeline.schedule='pipedream' is not supported"):
        PipelineConfig("pipedream")
    with pytest.raises(ConfigError, match=r"virtual_stages=2 needs pipeline.schedule='interleaved_1f1b'"):
        PipelineConfig("1f1b", 4, 2)
    with pytest.raises(ConfigError, match="microbatches=0"):
        PipelineConfig("gpipe", 0)
    PipelineConfig("gpipe", 4, 2).validate(MODEL, MESH, 16)  # looped GPipe is fine


def test_drop_in_rejects_gradient_accumulation():
    from jaxpar.train.pipeline import make_pipelined_loss_and_grads

    loss_and_grads = make_pipelined_loss_and_grads(mesh=None, pipeline_cfg=PipelineConfig("gpipe", 4))
    with pytest.raises(ConfigError, match="train.grad_accum_steps=2 with mesh.pipeline>1"):
        loss_and_grads(None, None, None, 2)
