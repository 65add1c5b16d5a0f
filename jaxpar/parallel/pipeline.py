"""Pipeline parallelism over the "pipeline" mesh axis: one jitted SPMD program runs a schedule table.

`pipelined_loss_and_grads` has the contract of `jaxpar.train.step.loss_and_grads`: (mean token loss over
the global batch, gradients w.r.t. the same nnx.State tree, token count, stats); parameters may come in
any layout (the rules ("layers", "pipeline") and ("vocab", ("pipeline", "tensor")) store them split over
the pipeline axis, so no device holds the whole model). Inside it:

- The stacked layers [L, ...] are viewed as [V, P, L/(P*V), ...]: device s holds chunks v = 0..V-1,
  global stage g = v*P + s, a contiguous slice of layers each (Megatron's interleaved layout).
- The batch is cut into M microbatches (rows j, j+M, ... as in step.py, so every microbatch is spread
  over the data axes).
- `jax.shard_map` is manual over "pipeline" only; data, fsdp and tensor stay Auto, so inside a stage
  the model's own sharding constraints (DP, FSDP, Megatron TP) apply exactly as without a pipeline.
- A `lax.scan` over the ticks of the schedule table (jaxpar.parallel.schedules) runs, per tick: the
  stage's action chosen by `lax.switch` on its row of the table (F, B, W or idle), the collective
  vocabulary-parallel pieces that tick needs, then `ppermute` of activations one device forward and of
  gradients one device backward. Every index (microbatch, chunk, stash slot, inbox slot) is computed
  in Python from the table, so the same table is the program.

Memory. A forward stashes the per-layer residuals of `jax.vjp` (weights excluded: they are read from
the stage's parameters again at backward time) in a slot of a stash buffer whose number of slots is
the schedule's peak of microbatches in flight on a stage: M*V for GPipe, P for 1F1B and ZB-H1,
about P + (P-1)/V chunks' worth for interleaved 1F1B. Compiled memory analysis shows the difference.

Embedding and output layer. Neither sits on one stage. The vocabulary is split over the pipeline
axis (as in "Balancing Pipeline Parallelism with Vocabulary Parallelism", Yeung et al. 2024): every
stage holds V/P rows of the embedding and V/P columns of the output layer.
- Embedding: in the tick where stage 0 runs F(m, chunk 0), every stage looks up the tokens of its
  vocabulary shard (others give 0) and a psum over the pipeline axis yields the embeddings. The input
  gradient of B(m, chunk 0) is psum-broadcast back and each stage scatter-adds its shard's rows.
- Output layer + loss: in the tick where the last stage runs F(m, last chunk), its output is
  psum-broadcast; every stage applies the final norm, computes logits for its vocabulary shard, and
  the log-sum-exp and target logit are reduced over the pipeline axis (pmax, psum). The gradient of
  the final hidden state is psum-reduced and lands in the last stage's gradient inbox, ready for its
  backward. Each stage keeps the output layer's gradient for its own shard.
So the vocabulary work of a microbatch costs every stage 1/P of the head instead of costing the last
stage all of it (in a lockstep pipeline a long tick on one stage is a long tick on all), and the
embedding and output-layer parameters (and their optimizer state) are spread evenly.

Lockstep. The ticks are synchronised by the ppermutes, so a tick lasts as long as its slowest stage.
1F1B-family tables mix forwards with (about twice as long) fused backwards in the same tick;
`PipelineConfig.split_backward` runs each backward as B then W in consecutive ticks to keep ticks
forward-sized, and ZB-H1 is split by construction (benchmarks/pipeline measures the difference).

Zero bubble (ZB-H1). Each layer's backward jaxpr is cut in two (LayerVjp.split): B evaluates the
equations the input gradient needs and stashes the values the rest reads (the cotangents at each
weight's matmul); W, later, evaluates only the weight-gradient equations. Nothing is computed twice:
the matmul FLOPs of B and W add up to the fused backward's (experiments/bench_pipeline.py measures
them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import jax.extend.core as jex
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from jaxpar.config import ModelConfig, PipelineConfig, require
from jaxpar.models.llama import REMAT_POLICIES, RESIDUAL
from jaxpar.parallel import rules
from jaxpar.parallel.schedules import Schedule
from jaxpar.train import step

AXIS = "pipeline"
IDLE, FWD, BWD, WGT = 0, 1, 2, 3
_KIND_CODE = {"F": FWD, "B": BWD, "W": WGT}


# --- the table, lowered to the executor's index arrays -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TickProgram:
    """Per-tick index arrays for the executor ([T, P] per stage, [T] when every stage agrees).

    Slots: `stash_slot` is where F writes its residuals and B/W read them (split backward: B also writes
    the layer cotangents there); `inbox_slot` is where F reads its input activation, B its output
    gradient; `fwd_recv`/`bwd_recv` are where this tick's ppermute deposits what arrives, and
    `head_slot` where the loss head deposits the last stage's output gradient. The last slot of each
    inbox is a dummy that absorbs writes nobody reads."""

    schedule: Schedule
    kind: np.ndarray
    microbatch: np.ndarray
    chunk: np.ndarray
    stash_slot: np.ndarray
    inbox_slot: np.ndarray
    fwd_recv: np.ndarray
    bwd_recv: np.ndarray
    head_slot: np.ndarray
    emb_mb: np.ndarray
    head_mb: np.ndarray
    embgrad_mb: np.ndarray
    fwd_comm: np.ndarray
    bwd_comm: np.ndarray
    num_stash: int
    num_fwd_inbox: int
    num_bwd_inbox: int

    def arrays(self) -> dict[str, np.ndarray]:
        names = ("kind", "microbatch", "chunk", "stash_slot", "inbox_slot", "fwd_recv", "bwd_recv",
                 "head_slot", "emb_mb", "head_mb", "embgrad_mb", "fwd_comm", "bwd_comm")
        return {name: getattr(self, name) for name in names}


def _assign_slots(intervals: list[tuple[int, int, object]]) -> tuple[dict[object, int], int]:
    """Interval partitioning: each (start, end, key) occupies a slot over [start, end] (inclusive);
    returns {key: slot} with the fewest slots (greedy by start time is optimal for intervals)."""
    slots: dict[object, int] = {}
    busy_until: list[int] = []  # per slot: last time it is occupied
    for start, end, key in sorted(intervals, key=lambda item: (item[0], item[1])):
        free = [i for i, until in enumerate(busy_until) if until < start]
        slot = free[0] if free else len(busy_until)
        if slot == len(busy_until):
            busy_until.append(end)
        else:
            busy_until[slot] = end
        slots[key] = slot
    return slots, len(busy_until)


def lower(schedule: Schedule) -> TickProgram:
    """Index arrays for the executor. Times are in half ticks: 2t is "during tick t" (compute), 2t+1
    "end of tick t" (a ppermute or the head delivers), so a slot read in tick t can take a delivery
    at the end of the same tick."""
    sched = schedule.validate()
    Pn, V, T = sched.num_stages, sched.virtual_stages, sched.num_ticks
    G = Pn * V
    release = "W" if sched.split_backward else "B"
    when: dict[tuple[str, int, int], tuple[int, int]] = {}  # (kind, m, g) -> (tick, stage)
    for tick, stage, a in sched.actions():
        when[(a.kind, a.microbatch, sched.global_stage(stage, a))] = (tick, stage)

    def new(fill=-1, shape=(T, Pn)):
        return np.full(shape, fill, np.int32)

    kind, mb, chunk = new(IDLE), new(0), new(0)
    stash_slot, inbox_slot = new(0), new(0)
    emb_mb, head_mb, embgrad_mb = new(-1, (T,)), new(-1, (T,)), new(-1, (T,))
    fwd_comm, bwd_comm = np.zeros(T, bool), np.zeros(T, bool)

    stash_iv = [[] for _ in range(Pn)]
    fwd_iv = [[] for _ in range(Pn)]
    bwd_iv = [[] for _ in range(Pn)]
    for tick, stage, a in sched.actions():
        g = sched.global_stage(stage, a)
        kind[tick, stage], mb[tick, stage], chunk[tick, stage] = _KIND_CODE[a.kind], a.microbatch, a.chunk
        if a.kind == "F":
            end_tick = when[(release, a.microbatch, g)][0]
            stash_iv[stage].append((2 * tick, 2 * end_tick, (a.microbatch, a.chunk)))
            if g == 0:
                emb_mb[tick] = a.microbatch
            else:
                sent = when[("F", a.microbatch, g - 1)][0]
                fwd_iv[stage].append((2 * sent + 1, 2 * tick, ("recv", a.microbatch, a.chunk)))
            if g < G - 1:
                fwd_comm[tick] = True
            else:
                head_mb[tick] = a.microbatch
        elif a.kind == "B":
            if g == G - 1:
                sent = when[("F", a.microbatch, g)][0]
                bwd_iv[stage].append((2 * sent + 1, 2 * tick, ("head", a.microbatch, a.chunk)))
            else:
                sent = when[("B", a.microbatch, g + 1)][0]
                bwd_iv[stage].append((2 * sent + 1, 2 * tick, ("recv", a.microbatch, a.chunk)))
            if g > 0:
                bwd_comm[tick] = True
            else:
                embgrad_mb[tick] = a.microbatch

    stash_slots, fwd_slots, bwd_slots = [], [], []
    for stage in range(Pn):
        stash_slots.append(_assign_slots(stash_iv[stage]))
        fwd_slots.append(_assign_slots(fwd_iv[stage]))
        bwd_slots.append(_assign_slots(bwd_iv[stage]))
    num_stash = max(n for _, n in stash_slots)
    num_fwd = max(max(n for _, n in fwd_slots), 1)
    num_bwd = max(max(n for _, n in bwd_slots), 1)
    fwd_recv, bwd_recv = new(num_fwd), new(num_bwd)
    head_slot = new(num_bwd, (T,))
    for tick, stage, a in sched.actions():
        g = sched.global_stage(stage, a)
        key = (a.microbatch, a.chunk)
        stash_slot[tick, stage] = stash_slots[stage][0][key]
        if a.kind == "F":
            inbox_slot[tick, stage] = num_fwd if g == 0 else fwd_slots[stage][0][("recv", *key)]
            if g > 0:
                sent_tick, _ = when[("F", a.microbatch, g - 1)]
                fwd_recv[sent_tick, stage] = fwd_slots[stage][0][("recv", *key)]
        elif a.kind == "B":
            tag = "head" if g == G - 1 else "recv"
            inbox_slot[tick, stage] = bwd_slots[stage][0][(tag, *key)]
            if g == G - 1:
                head_slot[when[("F", a.microbatch, g)][0]] = bwd_slots[stage][0][(tag, *key)]
            else:
                sent_tick, _ = when[("B", a.microbatch, g + 1)]
                bwd_recv[sent_tick, stage] = bwd_slots[stage][0][(tag, *key)]
    return TickProgram(sched, kind, mb, chunk, stash_slot, inbox_slot, fwd_recv, bwd_recv, head_slot, emb_mb,
                       head_mb, embgrad_mb, fwd_comm, bwd_comm, num_stash, num_fwd, num_bwd)


def ring_pairs(num_stages: int, virtual_stages: int, forward: bool) -> list[tuple[int, int]]:
    """ppermute pairs: one device along the pipeline (a ring when chunks wrap from the last device
    back to the first)."""
    last = num_stages if virtual_stages > 1 else num_stages - 1
    pairs = [(s, (s + 1) % num_stages) for s in range(last)]
    return pairs if forward else [(dst, src) for src, dst in pairs]


# --- the executor ---------------------------------------------------------------------------------------


class LayerVjp:
    """Per-layer `jax.vjp` whose residuals can live in a stash: the layer's weights are dropped from
    the residual leaves (found by identity) and put back from the live parameters at backward time.

    For a split backward (ZB-H1), `split(...)` cuts the layer's backward jaxpr in two: the equations
    the input gradient needs (B) and the rest, which only the weight gradients need (W). B also returns
    the values W reads from its part (the cotangents at each weight's matmul, e.g. dq, dk, dv, the MLP's
    gate/up cotangents), which are stashed until W. So B does no weight-gradient work and W only the
    weight-gradient matmuls: nothing is computed twice."""

    def __init__(self, block_graphdef, model_cfg: ModelConfig):
        self.block_graphdef = block_graphdef
        self.cfg = model_cfg
        self.treedef = None
        self.weight_index: tuple[int | None, ...] = ()
        self.input_part = self.weight_part = None  # set by split()
        self.boundary_avals: list = []

    def _apply(self, positions_BT, segment_ids_BT):
        graphdef = self.block_graphdef

        def layer(x_BTD, layer_params):
            return nnx.merge(graphdef, layer_params)(x_BTD, positions_BT, segment_ids_BT)

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        return layer

    def forward(self, x_BTD, layer_params, positions_BT, segment_ids_BT):
        """(output, residual leaves without the weights)."""
        y_BTD, vjp_fn = jax.vjp(self._apply(positions_BT, segment_ids_BT), x_BTD, layer_params)
        leaves, treedef = jax.tree.flatten(vjp_fn)
        weights = jax.tree.leaves(layer_params)
        index = tuple(next((i for i, w in enumerate(weights) if w is leaf), None) for leaf in leaves)
        if self.treedef is None:
            self.treedef, self.weight_index = treedef, index
        elif index != self.weight_index or treedef.num_leaves != self.treedef.num_leaves:
            raise AssertionError("the layer's vjp changed structure between traces")
        return y_BTD, [leaf for leaf, i in zip(leaves, index) if i is None]

    def _leaves(self, residuals, layer_params):
        weights = jax.tree.leaves(layer_params)
        stashed = iter(residuals)
        return [next(stashed) if i is None else weights[i] for i in self.weight_index]

    def backward(self, residuals, layer_params, g_BTD):
        """(input cotangent, parameter cotangents) from the stashed residuals."""
        return jax.tree.unflatten(self.treedef, self._leaves(residuals, layer_params))(g_BTD)

    def split(self, residuals, layer_params, g_BTD) -> list:
        """Cut the backward into input and weight parts (call once with abstract or real values of one
        layer, after `forward` has been traced). Returns the avals of the values B hands to W."""
        treedef = self.treedef

        def full_backward(leaves, g):
            gx, gw = jax.tree.unflatten(treedef, leaves)(g)
            return [gx, *jax.tree.leaves(gw)]

        closed = jax.make_jaxpr(full_backward)(self._leaves(residuals, layer_params), g_BTD)
        jaxpr = closed.jaxpr
        eqns = jaxpr.eqns

        def needed_for(outvars):
            need = {v for v in outvars if isinstance(v, jex.Var)}
            keep = [False] * len(eqns)
            for i in reversed(range(len(eqns))):
                if any(not isinstance(v, jex.DropVar) and v in need for v in eqns[i].outvars):
                    keep[i] = True
                    need.update(v for v in eqns[i].invars if isinstance(v, jex.Var))
            return keep

        for_input, for_weights = needed_for(jaxpr.outvars[:1]), needed_for(jaxpr.outvars[1:])
        weight_only = [e for e, b, w in zip(eqns, for_input, for_weights) if w and not b]
        from_input_part = {v for e, b in zip(eqns, for_input) if b for v in e.outvars}
        from_input_part.add(jaxpr.invars[-1])  # the output cotangent, which W may read directly
        boundary: list = []
        for var in [v for e in weight_only for v in e.invars] + list(jaxpr.outvars[1:]):
            if isinstance(var, jex.Var) and var in from_input_part and var not in boundary:
                boundary.append(var)
        def debug_info(name, n_in, n_out):
            return jex.DebugInfo(f"pipeline {name}", None, tuple(f"x{i}" for i in range(n_in)),
                                 tuple(f"out{i}" for i in range(n_out)))

        input_outvars = [jaxpr.outvars[0], *boundary]
        input_jaxpr = jaxpr.replace(
            outvars=input_outvars, eqns=[e for e, b in zip(eqns, for_input) if b],
            debug_info=debug_info("backward_input", len(jaxpr.invars), len(input_outvars)))
        weight_invars = [*jaxpr.invars[:-1], *boundary]
        weight_jaxpr = jaxpr.replace(invars=weight_invars, outvars=jaxpr.outvars[1:], eqns=weight_only,
                                     debug_info=debug_info("backward_weight", len(weight_invars),
                                                           len(jaxpr.outvars) - 1))
        self.input_part = jex.jaxpr_as_fun(jex.ClosedJaxpr(input_jaxpr, closed.consts))
        self.weight_part = jex.jaxpr_as_fun(jex.ClosedJaxpr(weight_jaxpr, closed.consts))
        self.boundary_avals = [v.aval for v in boundary]
        return self.boundary_avals

    def backward_input(self, residuals, layer_params, g_BTD):
        """(input cotangent, values for backward_weight): B of ZB-H1."""
        gx, *boundary = self.input_part(*self._leaves(residuals, layer_params), g_BTD)
        return gx, boundary

    def backward_weight(self, residuals, layer_params, boundary):
        """Parameter cotangents (structured like layer_params): W of ZB-H1."""
        grads = self.weight_part(*self._leaves(residuals, layer_params), *boundary)
        return jax.tree.unflatten(jax.tree.structure(layer_params), grads)


def _rms_norm(norm_graphdef, scale_state, x):
    return nnx.merge(norm_graphdef, scale_state)(x)


def pipelined_loss_and_grads(params: nnx.State, graphdef: nnx.GraphDef, batch, *, mesh: Mesh,
                             pipeline_cfg: PipelineConfig, grad_shardings=None, axis_name: str = AXIS):
    """(mean token loss, grads like `params`, token count, stats) over the global batch, the layers
    pipelined over the mesh's "pipeline" axis by `pipeline_cfg.schedule`: the contract of
    `jaxpar.train.step.loss_and_grads` (stats, the MoE router's, is {} for the dense blocks the pipeline
    runs). Call inside `jax.jit` under `jax.set_mesh(mesh)`."""
    if mesh.shape[axis_name] == 1:  # nothing to pipeline (and XLA rejects a manual axis of size 1)
        return step.loss_and_grads(params, graphdef, batch, 1, grad_shardings)
    schedule = pipeline_cfg.make_schedule(mesh.shape[axis_name])
    program = lower(schedule)
    with nnx.use_eager_sharding(False):
        model = nnx.merge(graphdef, params)
    cfg: ModelConfig = model.cfg
    Pn, V, M = schedule.num_stages, schedule.virtual_stages, schedule.microbatches
    L = cfg.n_layers
    require(L % (Pn * V) == 0, f"model.n_layers={L} is not divisible by mesh.pipeline*"
                                f"pipeline.virtual_stages={Pn}*{V}; see PipelineConfig.validate.")
    require(cfg.vocab_size % Pn == 0,
            f"model.vocab_size={cfg.vocab_size} is not divisible by mesh.pipeline={Pn}.")
    require(cfg.moe.experts == 0, "the pipeline runs dense blocks only; see PipelineConfig.validate.")
    k = L // (Pn * V)
    dtype = jnp.dtype(cfg.dtype)

    block_graphdef, blocks = nnx.split(model.blocks)
    norm_graphdef, norm_state = nnx.split(model.final_norm)
    blocks_VPk = jax.tree.map(lambda x: x.reshape(V, Pn, k, *x.shape[1:]), blocks)
    table = model.embed[...]
    unembed = None if cfg.tie_embeddings else model.unembed[...]

    mask_BT = batch["segment_ids"] != 0
    count = jnp.sum(mask_BT.astype(jnp.float32))
    micro = step.split_microbatches({key: batch[key] for key in step.BATCH_KEYS}, M)

    layer_vjp = LayerVjp(block_graphdef, cfg)
    arrays = {name: jnp.asarray(value) for name, value in program.arrays().items()}
    fwd_pairs = ring_pairs(Pn, V, forward=True)
    bwd_pairs = ring_pairs(Pn, V, forward=False)
    split_backward = schedule.split_backward

    def body(blocks_VPk, table_local, unembed_local, norm_state, micro, arrays):
        me = jax.lax.axis_index(axis_name)
        blocks_Vk = jax.tree.map(lambda x: x[:, 0], blocks_VPk)
        Vp = table_local.shape[0]
        offset = me * Vp
        mb_rows, seq = micro["inputs"].shape[1:]
        D = cfg.d_model
        act_shape = (mb_rows, seq, D)

        def act_zeros():  # in the layout of the residual stream between layers
            return rules.constrain(jnp.zeros(act_shape, dtype), RESIDUAL)

        def chunk_params(v):
            return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, v, keepdims=False), blocks_Vk)

        def layer_inputs(m):
            return micro["positions"][m], micro["segment_ids"][m]

        def stage_forward(x_BTD, v, m):
            positions, segment_ids = layer_inputs(m)

            def step(x, layer_params):
                return layer_vjp.forward(x, layer_params, positions, segment_ids)

            return jax.lax.scan(step, x_BTD, chunk_params(v))

        # Residual shapes of one chunk (k layers) for one microbatch, to size the stash.
        res_shapes = jax.eval_shape(lambda x: stage_forward(x, 0, 0)[1],
                                    jax.ShapeDtypeStruct(act_shape, dtype))
        def stash_buffer(per_layer, dtype_):
            """[slots + 1, k, *per_layer] zeros (the last slot absorbs writes of ticks that stash
            nothing), split over the batch shards where the residual has the microbatch's rows."""
            buffer = jnp.zeros((program.num_stash + 1, k, *per_layer), dtype_)  # + a spare slot
            if per_layer and per_layer[0] == mb_rows:
                buffer = rules.constrain(buffer, (None, None, "batch") + (None,) * (len(per_layer) - 1))
            return buffer

        stash = [stash_buffer(s.shape[1:], s.dtype) for s in res_shapes]
        weight_stash = None
        if split_backward:  # what B hands to W, per layer
            one_layer = lambda tree, lead: jax.tree.map(  # noqa: E731
                lambda x: jax.ShapeDtypeStruct(x.shape[lead:], x.dtype), tree)
            boundary = layer_vjp.split(one_layer(res_shapes, 1), one_layer(blocks_Vk, 2),
                                       jax.ShapeDtypeStruct(act_shape, dtype))
            weight_stash = [stash_buffer(a.shape, a.dtype) for a in boundary]

        def lookup(m):
            local = micro["inputs"][m] - offset
            valid = (local >= 0) & (local < Vp)
            rows = jnp.take(table_local, jnp.clip(local, 0, Vp - 1), axis=0)
            rows = jnp.where(valid[..., None], rows, jnp.zeros((), rows.dtype))
            return jax.lax.psum(rows, axis_name).astype(dtype)

        def head(h_BTD, m, norm_state, weight):
            """Loss sum, gradient of the final hidden state (summed over stages), and this stage's
            gradients of the final norm and of its output-layer shard."""
            targets = micro["targets"][m] - offset
            mask = (micro["segment_ids"][m] != 0).astype(jnp.float32)

            def logits_fn(h, norm_state, weight):
                x = rules.constrain(_rms_norm(norm_graphdef, norm_state, h), ("batch", "length", "act_embed"))
                spec = "btd,vd->btv" if cfg.tie_embeddings else "btd,dv->btv"
                return jnp.einsum(spec, x, weight.astype(dtype), preferred_element_type=jnp.float32)

            logits, vjp_fn = jax.vjp(logits_fn, h_BTD, norm_state, weight)
            top = jax.lax.pmax(jnp.max(logits, axis=-1), axis_name)
            sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1), axis_name)
            lse = top + jnp.log(sum_exp)
            onehot = jax.nn.one_hot(targets, Vp, dtype=jnp.float32)  # zero outside this shard
            target_logit = jax.lax.psum(jnp.sum(logits * onehot, axis=-1), axis_name)
            loss_sum = jnp.sum((lse - target_logit) * mask)
            dlogits = (jnp.exp(logits - lse[..., None]) - onehot) * mask[..., None]
            dh, dnorm, dweight = vjp_fn(dlogits)
            dh = jax.lax.psum(dh, axis_name).astype(dtype)
            return loss_sum, dh, to_f32(dnorm), dweight.astype(jnp.float32)

        head_weight = table_local if cfg.tie_embeddings else unembed_local

        def inbox(slots):  # + a spare slot for deliveries nobody reads
            return rules.constrain(jnp.zeros((slots + 1, *act_shape), dtype), (None, *RESIDUAL))

        f32 = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)  # noqa: E731
        carry = {
            "fwd_inbox": inbox(program.num_fwd_inbox),
            "bwd_inbox": inbox(program.num_bwd_inbox),
            "stash": stash,
            "weight_stash": weight_stash,
            "g_blocks": f32(blocks_Vk),
            "g_table": jnp.zeros(table_local.shape, jnp.float32),
            "g_unembed": None if unembed_local is None else jnp.zeros(unembed_local.shape, jnp.float32),
            "g_norm": f32(norm_state),
            "loss_sum": jnp.zeros((), jnp.float32),
        }

        def to_f32(tree):
            return jax.tree.map(lambda x: x.astype(jnp.float32), tree)

        def take_slot(buffers, slot):
            return [jax.lax.dynamic_index_in_dim(b, slot, keepdims=False) for b in buffers]

        def tick(carry, row):
            """One lockstep tick. Large buffers (stash, inboxes, accumulators) never pass through a
            switch or cond: those return per-tick values, and the buffers are updated outside with a
            dynamic-update-slice at a slot the table picked (the spare last slot when nothing is
            written), which XLA does in place; passed through a conditional they would be copied."""
            here = {name: row[name][me] for name in
                    ("kind", "microbatch", "chunk", "stash_slot", "inbox_slot", "fwd_recv", "bwd_recv")}
            kind, m, v, slot = here["kind"], here["microbatch"], here["chunk"], here["stash_slot"]
            x_emb = jax.lax.cond(row["emb_mb"] >= 0, lambda: lookup(jnp.maximum(row["emb_mb"], 0)), act_zeros)
            first = (v == 0) & (me == 0)
            x_in = jnp.where(first, x_emb, carry["fwd_inbox"][here["inbox_slot"]])
            g_in = carry["bwd_inbox"][here["inbox_slot"]]
            residuals = take_slot(carry["stash"], slot)
            handed_over = take_slot(carry["weight_stash"], slot) if split_backward else []
            params_v = chunk_params(v)
            no_residuals = [jnp.zeros_like(r) for r in residuals]
            no_handover = [jnp.zeros_like(h) for h in handed_over]
            no_grads = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params_v)

            def idle():
                return act_zeros(), act_zeros(), no_residuals, no_handover, no_grads

            def forward():
                y, new_residuals = stage_forward(x_in, v, m)
                return y, act_zeros(), new_residuals, no_handover, no_grads

            def backward():
                def step(g, xs):
                    res, layer_params = xs
                    if split_backward:  # B of ZB-H1: input gradient only; keep what W needs
                        return layer_vjp.backward_input(res, layer_params, g)
                    return layer_vjp.backward(res, layer_params, g)

                gx, per_layer = jax.lax.scan(step, g_in, (residuals, params_v), reverse=True)
                if split_backward:
                    return act_zeros(), gx.astype(dtype), no_residuals, per_layer, no_grads
                return act_zeros(), gx.astype(dtype), no_residuals, no_handover, to_f32(per_layer)

            def weight():
                def step(_, xs):
                    return None, layer_vjp.backward_weight(*xs)

                _, grads_k = jax.lax.scan(step, None, (residuals, params_v, handed_over))
                return act_zeros(), act_zeros(), no_residuals, no_handover, to_f32(grads_k)

            branches = [idle, forward, backward] + ([weight] if split_backward else [])
            y, gx, new_residuals, new_handover, grads_k = jax.lax.switch(kind, branches)
            spare = program.num_stash
            stash_at = jnp.where(kind == FWD, slot, spare)
            carry = dict(carry, stash=[b.at[stash_at].set(r) for b, r in zip(carry["stash"], new_residuals)],
                         g_blocks=jax.tree.map(lambda acc, g: acc.at[v].add(g), carry["g_blocks"], grads_k))
            if split_backward:
                handover_at = jnp.where(kind == BWD, slot, spare)
                carry["weight_stash"] = [b.at[handover_at].set(x)
                                         for b, x in zip(carry["weight_stash"], new_handover)]

            def run_head():
                h = jax.lax.psum(jnp.where(me == Pn - 1, y, jnp.zeros((), y.dtype)), axis_name)
                return head(h, row["head_mb"], norm_state, head_weight)

            def no_head():
                return (jnp.zeros((), jnp.float32), act_zeros(),
                        to_f32(jax.tree.map(jnp.zeros_like, norm_state)),
                        jnp.zeros(head_weight.shape, jnp.float32))

            loss_sum, dh, dnorm, dweight = jax.lax.cond(row["head_mb"] >= 0, run_head, no_head)
            head_at = jnp.where((me == Pn - 1) & (row["head_mb"] >= 0), row["head_slot"],
                                program.num_bwd_inbox)
            carry = dict(carry, loss_sum=carry["loss_sum"] + loss_sum,
                         bwd_inbox=carry["bwd_inbox"].at[head_at].set(dh),
                         g_norm=jax.tree.map(jnp.add, carry["g_norm"], dnorm))
            weight_grads = "g_table" if cfg.tie_embeddings else "g_unembed"
            carry[weight_grads] = carry[weight_grads] + dweight

            # The embedding's gradient: stage 0's input gradient, broadcast, scatter-added per shard.
            def broadcast_input_grad():
                return jax.lax.psum(jnp.where(me == 0, gx, jnp.zeros((), gx.dtype)), axis_name)

            g0 = jax.lax.cond(row["embgrad_mb"] >= 0, broadcast_input_grad, act_zeros).astype(jnp.float32)
            local = micro["inputs"][jnp.maximum(row["embgrad_mb"], 0)] - offset
            valid = ((local >= 0) & (local < Vp))[..., None]
            carry["g_table"] = carry["g_table"].at[jnp.clip(local, 0, Vp - 1)].add(jnp.where(valid, g0, 0.0))

            # Activations one device forward, gradients one device back (only in ticks that send).
            def send(flag, value, pairs):
                return jax.lax.cond(flag, lambda: jax.lax.ppermute(value, axis_name, pairs), act_zeros)

            received_x = send(row["fwd_comm"], y, fwd_pairs)
            received_g = send(row["bwd_comm"], gx, bwd_pairs)
            carry["fwd_inbox"] = carry["fwd_inbox"].at[here["fwd_recv"]].set(received_x)
            carry["bwd_inbox"] = carry["bwd_inbox"].at[here["bwd_recv"]].set(received_g)
            return carry, None

        carry, _ = jax.lax.scan(tick, carry, arrays)
        g_norm = jax.lax.psum(carry["g_norm"], axis_name)
        g_blocks = jax.tree.map(lambda x: x[:, None], carry["g_blocks"])
        return carry["loss_sum"], g_blocks, carry["g_table"], carry["g_unembed"], g_norm

    blocks_spec = jax.tree.map(lambda _: P(None, axis_name), blocks_VPk)
    in_specs = (blocks_spec, P(axis_name), P() if unembed is None else P(None, axis_name), P(), P(), P())
    out_specs = (P(), blocks_spec, P(axis_name), P() if unembed is None else P(None, axis_name), P())
    run = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={axis_name},
                        check_vma=False)
    loss_sum, g_blocks, g_table, g_unembed, g_norm = run(blocks_VPk, table, unembed, norm_state, micro,
                                                         arrays)

    g_blocks = jax.tree.map(lambda x: x.reshape(L, *x.shape[3:]), g_blocks)
    def by_path(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): leaf for path, leaf in flat}

    block_grads, norm_grads = by_path(g_blocks), by_path(g_norm)
    denominator = jnp.maximum(count, 1.0)

    def pick(path, leaf):
        top, rest = path[0].key, jax.tree_util.keystr(path[1:])
        grad = {"blocks": lambda: block_grads[rest], "final_norm": lambda: norm_grads[rest],
                "embed": lambda: g_table, "unembed": lambda: g_unembed}[top]()
        return (grad / denominator).astype(leaf.dtype)

    grads = jax.tree_util.tree_map_with_path(pick, params)
    if grad_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    return loss_sum / denominator, grads, count, {}


def make_pipelined_loss_and_grads(mesh: Mesh, pipeline_cfg: PipelineConfig):
    """A drop-in for `jaxpar.train.step.loss_and_grads` (same signature and results). The pipeline's
    microbatches are its gradient accumulation, so grad_accum_steps must be 1."""

    def loss_and_grads(params, graphdef, batch, grad_accum_steps: int = 1, grad_shardings=None):
        require(grad_accum_steps == 1,
                f"train.grad_accum_steps={grad_accum_steps} with mesh.pipeline>1: the pipeline accumulates "
                "over pipeline.microbatches instead; set train.grad_accum_steps=1 and raise "
                "pipeline.microbatches.")
        return pipelined_loss_and_grads(params, graphdef, batch, mesh=mesh, pipeline_cfg=pipeline_cfg,
                                        grad_shardings=grad_shardings)

    return loss_and_grads


def activation_bytes(model_cfg: ModelConfig, microbatch_rows: int, seq_len: int,
                     mesh_sizes: Mapping[str, int] | None = None) -> int:
    """Bytes one device holds of one microbatch activation (what one ppermute moves per device): rows
    split over data*fsdp, the sequence over tensor (the residual stream is sequence-parallel)."""
    sizes = mesh_sizes or {}
    rows = microbatch_rows // (sizes.get("data", 1) * sizes.get("fsdp", 1))
    length = seq_len // (sizes.get("tensor", 1) * sizes.get("sequence", 1))
    return rows * length * model_cfg.d_model * np.dtype(model_cfg.dtype).itemsize


def expected_ppermute_bytes(program: TickProgram, act_bytes: int) -> dict[str, int]:
    """Analytic ppermute bytes per device per step (module convention of jaxpar.parallel.analysis:
    operand bytes per execution): the executor moves one activation buffer forward in every tick in
    which some stage sends one, and one gradient buffer backward likewise. `useful` is the part that
    carries data, averaged over devices: each microbatch crosses G-1 stage boundaries each way."""
    sched = program.schedule
    G = sched.num_global_stages
    forward = int(program.fwd_comm.sum()) * act_bytes
    backward = int(program.bwd_comm.sum()) * act_bytes
    useful = 2 * sched.microbatches * (G - 1) * act_bytes / sched.num_stages
    return {"forward": forward, "backward": backward, "total": forward + backward, "useful": int(useful)}


