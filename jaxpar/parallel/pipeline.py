"""Pipeline parallelism over one mesh axis: one jitted SPMD program runs a schedule table.

`run_schedule` is the executor, and it knows no model. The caller gives it one layer as a function
with its parameters stacked over layers, the layers' per-microbatch inputs, and the two ends of the
model ("edges": the first stage's input and the loss head after the last stage) as callables with an
opaque pytree of parameters. jaxpar.train.pipeline builds these pieces for the language model. Inside:

- The stacked layers [L, ...] are viewed as [V, P, L/(P*V), ...]: device s holds chunks v = 0..V-1,
  global stage g = v*P + s, a contiguous slice of layers each (Megatron's interleaved layout).
- `jax.shard_map` is manual over the pipeline axis only; every other mesh axis stays Auto, so inside
  a stage the layers' own sharding constraints (DP, FSDP, Megatron TP) apply exactly as without a
  pipeline.
- A `lax.scan` over the ticks of the schedule table (jaxpar.parallel.schedules) runs, per tick: the
  stage's action chosen by `lax.switch` on its row of the table (F, B, W or idle), the collective
  edge work that tick needs, then `ppermute` of activations one device forward and of gradients one
  device backward. Every index (microbatch, chunk, stash slot, inbox slot) is computed in Python from
  the table (`lower`), so the same table is the program.

Edges. Neither end sits on one stage: every stage calls the edge callables in the same tick, so they
may use collectives over the pipeline axis and split their work (and parameters) over it; the
language model splits its vocabulary this way.
- Input: in the tick where stage 0 runs F(m, chunk 0), every stage calls `first_input`, and stage 0
  takes the result. The input gradient of B(m, chunk 0) is psum-broadcast from stage 0, and every
  stage folds it into its edge gradients with `accumulate_input_grad`.
- Head: in the tick where the last stage runs F(m, last chunk), its output is psum-broadcast and every
  stage calls `head`: loss sum, gradient of the head's input (which lands in the last stage's
  gradient inbox, ready for its backward) and this stage's gradients of the edge parameters.
Edge gradients of parameters replicated over the pipeline axis are per-stage partial sums, psum'd at
the end; those of parameters split over it belong to the stage's shard.

Memory. A forward stashes the per-layer residuals of `jax.vjp` (weights excluded: they are read from
the stage's parameters again at backward time) in a slot of a stash buffer whose number of slots is
the schedule's peak of microbatches in flight on a stage: M*V for GPipe, P for 1F1B and ZB-H1,
about P + (P-1)/V chunks' worth for interleaved 1F1B. Compiled memory analysis shows the difference.

Lockstep. The ticks are synchronised by the ppermutes, so a tick lasts as long as its slowest stage.
1F1B-family tables mix forwards with (about twice as long) fused backwards in the same tick; a split
backward (`Schedule.split_backward`, the config's pipeline.split_backward) runs each backward as B
then W in consecutive ticks to keep ticks forward-sized, and ZB-H1 is split by construction
(benchmarks/pipeline measures the difference).

Zero bubble (ZB-H1). Each layer's backward jaxpr is cut in two (LayerVjp.split): B evaluates the
equations the input gradient needs and stashes the values the rest reads (the cotangents at each
weight's matmul); W, later, evaluates only the weight-gradient equations. Nothing is computed twice:
the matmul FLOPs of B and W add up to the fused backward's (experiments/bench_pipeline.py measures
them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxpar.parallel import rules
from jaxpar.parallel.schedules import Schedule

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
        names = (
            "kind",
            "microbatch",
            "chunk",
            "stash_slot",
            "inbox_slot",
            "fwd_recv",
            "bwd_recv",
            "head_slot",
            "emb_mb",
            "head_mb",
            "embgrad_mb",
            "fwd_comm",
            "bwd_comm",
        )
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
    return TickProgram(
        sched,
        kind,
        mb,
        chunk,
        stash_slot,
        inbox_slot,
        fwd_recv,
        bwd_recv,
        head_slot,
        emb_mb,
        head_mb,
        embgrad_mb,
        fwd_comm,
        bwd_comm,
        num_stash,
        num_fwd,
        num_bwd,
    )


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

    `layer_fn(x, layer_params, *layer_inputs) -> y` is one layer (already wrapped in `jax.checkpoint`
    if it is to be rematerialised); gradients are taken w.r.t. x and layer_params.

    For a split backward (ZB-H1), `split(...)` cuts the layer's backward jaxpr in two: the equations
    the input gradient needs (B) and the rest, which only the weight gradients need (W). B also returns
    the values W reads from its part (the cotangents at each weight's matmul, e.g. dq, dk, dv, the MLP's
    gate/up cotangents), which are stashed until W. So B does no weight-gradient work and W only the
    weight-gradient matmuls: nothing is computed twice."""

    def __init__(self, layer_fn: Callable):
        self.layer_fn = layer_fn
        self.treedef = None
        self.weight_index: tuple[int | None, ...] = ()
        self.input_part = self.weight_part = None  # set by split()
        self.boundary_avals: list = []

    def forward(self, x_BTD, layer_params, *layer_inputs):
        """(output, residual leaves without the weights)."""
        y_BTD, vjp_fn = jax.vjp(lambda x, p: self.layer_fn(x, p, *layer_inputs), x_BTD, layer_params)
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
            return jex.DebugInfo(
                f"pipeline {name}",
                None,
                tuple(f"x{i}" for i in range(n_in)),
                tuple(f"out{i}" for i in range(n_out)),
            )

        input_outvars = [jaxpr.outvars[0], *boundary]
        input_jaxpr = jaxpr.replace(
            outvars=input_outvars,
            eqns=[e for e, b in zip(eqns, for_input) if b],
            debug_info=debug_info("backward_input", len(jaxpr.invars), len(input_outvars)),
        )
        weight_invars = [*jaxpr.invars[:-1], *boundary]
        weight_jaxpr = jaxpr.replace(
            invars=weight_invars,
            outvars=jaxpr.outvars[1:],
            eqns=weight_only,
            debug_info=debug_info("backward_weight", len(weight_invars), len(jaxpr.outvars) - 1),
        )
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


class TickOut(NamedTuple):
    """What one stage's action yields in a tick; zeros for what the action does not produce."""

    y: jax.Array  # F: the chunk's output, sent one device forward
    gx: jax.Array  # B: the chunk's input gradient, sent one device back
    residuals: list  # F: per residual leaf, [k, ...] over the chunk's layers, to stash
    handover: list  # B of a split backward: per value W reads, [k, ...], to stash
    grads: Any  # fused B or W: the chunk's parameter gradients [k, ...], float32


class HeadOut(NamedTuple):
    """What the loss head returns on every stage."""

    loss_sum: jax.Array
    dh: jax.Array  # gradient of the head's input, whole (summed over stages), in the activation dtype
    grads: Any  # this stage's gradients of the edge parameters (float32); None where the head reads none


class _Carry(NamedTuple):
    fwd_inbox: jax.Array  # [slots + 1, *activation]: activations received, by slot
    bwd_inbox: jax.Array  # [slots + 1, *activation]: gradients received or from the head, by slot
    stash: list  # per residual leaf: [slots + 1, k, ...]
    handover: list  # split backward, per value B hands to W: [slots + 1, k, ...]
    layer_grads: Any  # [V, k, ...] float32
    edge_grads: Any  # like the edge parameters, float32
    loss_sum: jax.Array


@dataclasses.dataclass(frozen=True)
class _Callables:
    layer_fn: Callable
    first_input: Callable
    accumulate_input_grad: Callable
    head: Callable
    axis_name: str
    act_names: tuple[str | None, ...]


def _zeros(shapes):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _f32_zeros(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def _to_f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _take_slot(buffers, slot):
    return [jax.lax.dynamic_index_in_dim(b, slot, keepdims=False) for b in buffers]


def _splits_over(spec: P, axis_name: str) -> bool:
    return any(entry == axis_name or (isinstance(entry, tuple) and axis_name in entry) for entry in spec)


class _Stage:
    """One device's side of the executor, inside the shard_map: its chunks of layers, its edge
    parameters and the pieces of a tick."""

    def __init__(self, program: TickProgram, fns: _Callables, layers_VPk, edges, layer_inputs, microbatches):
        self.program, self.fns = program, fns
        self.split_backward = program.schedule.split_backward
        self.me = jax.lax.axis_index(fns.axis_name)
        self.layers_Vk = jax.tree.map(lambda x: x[:, 0], layers_VPk)
        self.layers_per_chunk = jax.tree.leaves(self.layers_Vk)[0].shape[1]
        self.edges, self.layer_inputs, self.microbatches = edges, layer_inputs, microbatches
        self.layer_vjp = LayerVjp(fns.layer_fn)
        act = jax.eval_shape(fns.first_input, edges, self.microbatch(0))
        self.act = jax.ShapeDtypeStruct(act.shape, act.dtype)
        self.head_shapes = jax.eval_shape(lambda h: fns.head(h, self.microbatch(0), edges), self.act)

    def microbatch(self, m):
        return jax.tree.map(lambda x: x[m], self.microbatches)

    def act_zeros(self):  # in the layout of the activations between layers
        return rules.constrain(jnp.zeros(self.act.shape, self.act.dtype), self.fns.act_names)

    def chunk_params(self, v):
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, v, keepdims=False), self.layers_Vk)

    def chunk_forward(self, x_BTD, v, m):
        """(chunk v's output, its residual leaves stacked over its layers) for microbatch m."""
        layer_inputs = tuple(x[m] for x in self.layer_inputs)

        def step(x, layer_params):
            return self.layer_vjp.forward(x, layer_params, *layer_inputs)

        return jax.lax.scan(step, x_BTD, self.chunk_params(v))

    def stash_buffer(self, per_layer):
        """[slots + 1, k, *per_layer] zeros (the last slot absorbs writes of ticks that stash
        nothing), split like the activations' rows where the residual has the microbatch's rows."""
        shape = per_layer.shape
        buffer = jnp.zeros((self.program.num_stash + 1, self.layers_per_chunk, *shape), per_layer.dtype)
        if shape and shape[0] == self.act.shape[0]:
            buffer = rules.constrain(buffer, (None, None, self.fns.act_names[0]) + (None,) * (len(shape) - 1))
        return buffer

    def inbox(self, slots):  # + a spare slot for deliveries nobody reads
        zeros = jnp.zeros((slots + 1, *self.act.shape), self.act.dtype)
        return rules.constrain(zeros, (None, *self.fns.act_names))

    def initial_carry(self) -> _Carry:
        # Residual shapes of one chunk for one microbatch (this first trace also fixes the vjp's structure).
        residuals = jax.eval_shape(lambda x: self.chunk_forward(x, 0, 0)[1], self.act)
        stash = [self.stash_buffer(jax.ShapeDtypeStruct(r.shape[1:], r.dtype)) for r in residuals]
        handover = []
        if self.split_backward:

            def one_layer(tree, lead):
                return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[lead:], x.dtype), tree)

            boundary = self.layer_vjp.split(one_layer(residuals, 1), one_layer(self.layers_Vk, 2), self.act)
            handover = [self.stash_buffer(aval) for aval in boundary]
        return _Carry(
            fwd_inbox=self.inbox(self.program.num_fwd_inbox),
            bwd_inbox=self.inbox(self.program.num_bwd_inbox),
            stash=stash,
            handover=handover,
            layer_grads=_f32_zeros(self.layers_Vk),
            edge_grads=_f32_zeros(self.edges),
            loss_sum=jnp.zeros((), jnp.float32),
        )

    def tick(self, carry: _Carry, row) -> tuple[_Carry, None]:
        """One lockstep tick. Large buffers (stash, inboxes, accumulators) never pass through a
        switch or cond: those return per-tick values, and the buffers are updated outside with a
        dynamic-update-slice at a slot the table picked (the spare last slot when nothing is
        written), which XLA does in place; passed through a conditional they would be copied."""
        here = {
            name: row[name][self.me]
            for name in ("kind", "microbatch", "chunk", "stash_slot", "inbox_slot", "fwd_recv", "bwd_recv")
        }
        out = self.action(carry, row, here)
        carry = self.store(carry, here, out)
        carry = self.loss_head(carry, row, out.y)
        carry = self.input_grad(carry, row, out.gx)
        return self.communicate(carry, row, here, out), None

    def action(self, carry: _Carry, row, here) -> TickOut:
        """This stage's F, B, W or nothing, chosen by the table."""
        kind, m, v, slot = here["kind"], here["microbatch"], here["chunk"], here["stash_slot"]

        def first_input():
            return self.fns.first_input(self.edges, self.microbatch(jnp.maximum(row["emb_mb"], 0)))

        x_first = jax.lax.cond(row["emb_mb"] >= 0, first_input, self.act_zeros)
        x_in = jnp.where((v == 0) & (self.me == 0), x_first, carry.fwd_inbox[here["inbox_slot"]])
        g_in = carry.bwd_inbox[here["inbox_slot"]]
        residuals = _take_slot(carry.stash, slot)
        handed_over = _take_slot(carry.handover, slot)
        params_v = self.chunk_params(v)
        no_residuals = [jnp.zeros_like(r) for r in residuals]
        no_handover = [jnp.zeros_like(h) for h in handed_over]
        no_grads = _f32_zeros(params_v)
        layer_vjp, dtype = self.layer_vjp, self.act.dtype

        def idle():
            return TickOut(self.act_zeros(), self.act_zeros(), no_residuals, no_handover, no_grads)

        def forward():
            y, new_residuals = self.chunk_forward(x_in, v, m)
            return TickOut(y, self.act_zeros(), new_residuals, no_handover, no_grads)

        def backward():
            def step(g, xs):
                if self.split_backward:  # B of ZB-H1: input gradient only; keep what W needs
                    return layer_vjp.backward_input(*xs, g)
                return layer_vjp.backward(*xs, g)

            gx, per_layer = jax.lax.scan(step, g_in, (residuals, params_v), reverse=True)
            if self.split_backward:
                return TickOut(self.act_zeros(), gx.astype(dtype), no_residuals, per_layer, no_grads)
            return TickOut(self.act_zeros(), gx.astype(dtype), no_residuals, no_handover, _to_f32(per_layer))

        def weight():
            def step(_, xs):
                return None, layer_vjp.backward_weight(*xs)

            _, grads_k = jax.lax.scan(step, None, (residuals, params_v, handed_over))
            return TickOut(self.act_zeros(), self.act_zeros(), no_residuals, no_handover, _to_f32(grads_k))

        branches = [idle, forward, backward] + ([weight] if self.split_backward else [])
        return jax.lax.switch(kind, branches)

    def store(self, carry: _Carry, here, out: TickOut) -> _Carry:
        """Stash F's residuals and B's handover in their slots; add the chunk's gradients."""
        kind, v, slot, spare = here["kind"], here["chunk"], here["stash_slot"], self.program.num_stash
        stash_at = jnp.where(kind == FWD, slot, spare)
        handover_at = jnp.where(kind == BWD, slot, spare)
        return carry._replace(
            stash=[b.at[stash_at].set(r) for b, r in zip(carry.stash, out.residuals)],
            layer_grads=jax.tree.map(lambda acc, g: acc.at[v].add(g), carry.layer_grads, out.grads),
            handover=[b.at[handover_at].set(x) for b, x in zip(carry.handover, out.handover)],
        )

    def loss_head(self, carry: _Carry, row, y) -> _Carry:
        """In the tick of a last-chunk F: the head on every stage, on the last stage's output."""
        axis_name, last = self.fns.axis_name, self.program.schedule.num_stages - 1

        def head():
            h = jax.lax.psum(jnp.where(self.me == last, y, jnp.zeros((), y.dtype)), axis_name)
            return self.fns.head(h, self.microbatch(row["head_mb"]), self.edges)

        def no_head():
            shapes = self.head_shapes
            return HeadOut(_zeros(shapes.loss_sum), self.act_zeros(), _zeros(shapes.grads))

        out = jax.lax.cond(row["head_mb"] >= 0, head, no_head)
        head_at = jnp.where(
            (self.me == last) & (row["head_mb"] >= 0), row["head_slot"], self.program.num_bwd_inbox
        )
        edge_grads = jax.tree.map(lambda acc, g: acc if g is None else acc + g, carry.edge_grads, out.grads)
        return carry._replace(
            loss_sum=carry.loss_sum + out.loss_sum,
            bwd_inbox=carry.bwd_inbox.at[head_at].set(out.dh),
            edge_grads=edge_grads,
        )

    def input_grad(self, carry: _Carry, row, gx) -> _Carry:
        """In the tick of a chunk-0 B: stage 0's input gradient, broadcast, folded into the edge
        gradients on every stage. (Other ticks fold zeros, which leaves the sums unchanged.)"""

        def broadcast():
            return jax.lax.psum(jnp.where(self.me == 0, gx, jnp.zeros((), gx.dtype)), self.fns.axis_name)

        g_BTD = jax.lax.cond(row["embgrad_mb"] >= 0, broadcast, self.act_zeros).astype(jnp.float32)
        mb = self.microbatch(jnp.maximum(row["embgrad_mb"], 0))
        return carry._replace(edge_grads=self.fns.accumulate_input_grad(carry.edge_grads, g_BTD, mb))

    def communicate(self, carry: _Carry, row, here, out: TickOut) -> _Carry:
        """Activations one device forward, gradients one device back (only in ticks that send)."""
        schedule, axis_name = self.program.schedule, self.fns.axis_name

        def send(flag, value, forward):
            pairs = ring_pairs(schedule.num_stages, schedule.virtual_stages, forward)
            return jax.lax.cond(flag, lambda: jax.lax.ppermute(value, axis_name, pairs), self.act_zeros)

        received_x = send(row["fwd_comm"], out.y, forward=True)
        received_g = send(row["bwd_comm"], out.gx, forward=False)
        return carry._replace(
            fwd_inbox=carry.fwd_inbox.at[here["fwd_recv"]].set(received_x),
            bwd_inbox=carry.bwd_inbox.at[here["bwd_recv"]].set(received_g),
        )

    def results(self, carry: _Carry, edge_specs):
        """(loss sum, layer gradients [V, 1, k, ...], edge gradients): the edge gradients of parameters
        replicated over the pipeline axis are partial sums over stages, summed here."""
        axis_name = self.fns.axis_name

        def total(spec, g):
            return g if _splits_over(spec, axis_name) else jax.lax.psum(g, axis_name)

        edge_grads = jax.tree.map(total, edge_specs, carry.edge_grads)
        return carry.loss_sum, jax.tree.map(lambda x: x[:, None], carry.layer_grads), edge_grads


def run_schedule(
    program: TickProgram,
    *,
    mesh: Mesh,
    axis_name: str,
    act_names: Sequence[str | None],
    layer_fn: Callable,
    layers,
    layer_inputs: Sequence[jax.Array],
    edges,
    edge_specs,
    microbatches,
    first_input: Callable,
    accumulate_input_grad: Callable,
    head: Callable,
):
    """(loss sum, layer gradients [L, ...], edge gradients like `edges`), float32 sums over the
    microbatches, of the layers pipelined over `axis_name` by `program`. Call inside `jax.jit` under
    `jax.set_mesh(mesh)`.

    layer_fn(x, layer_params, *layer_inputs) -> y is one layer (rematerialised by the caller if it
    should be); `layers` holds its parameters stacked [L, ...], L a multiple of P*V.
    layer_inputs: [M, ...] arrays; microbatch m's layers get their slices at m as extra arguments.
    act_names: the logical axis names of an activation between layers (its first, the microbatch's rows).
    The edge callables run on every stage in the same tick and may use collectives over `axis_name`;
    `mb` is microbatch m's slice of `microbatches` (a pytree of [M, ...] arrays), `edges` the edge
    parameters as `edge_specs` (PartitionSpecs over `axis_name`, a prefix of `edges`) lay them out:
      first_input(edges, mb) -> x, the first stage's input;
      accumulate_input_grad(edge_grads, g_x, mb) -> edge_grads, the first stage's input gradient g_x
        (float32) folded into the edge gradients (an update of the accumulator, so that a scatter-add
        lands in it directly);
      head(h, mb, edges) -> HeadOut, given the last stage's output h."""
    schedule = program.schedule
    Pn, V = schedule.num_stages, schedule.virtual_stages
    L = jax.tree.leaves(layers)[0].shape[0]
    if L % (Pn * V):
        raise ValueError(f"{L} layers do not split into {Pn} stages x {V} chunks")
    k = L // (Pn * V)
    layers_VPk = jax.tree.map(lambda x: x.reshape(V, Pn, k, *x.shape[1:]), layers)
    fns = _Callables(layer_fn, first_input, accumulate_input_grad, head, axis_name, tuple(act_names))
    arrays = {name: jnp.asarray(value) for name, value in program.arrays().items()}

    def body(layers_VPk, edges, layer_inputs, microbatches, arrays):
        stage = _Stage(program, fns, layers_VPk, edges, layer_inputs, microbatches)
        carry, _ = jax.lax.scan(stage.tick, stage.initial_carry(), arrays)
        return stage.results(carry, edge_specs)

    layer_specs = jax.tree.map(lambda _: P(None, axis_name), layers_VPk)
    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(layer_specs, edge_specs, P(), P(), P()),
        out_specs=(P(), layer_specs, edge_specs),
        axis_names={axis_name},
        check_vma=False,
    )
    loss_sum, layer_grads, edge_grads = run(layers_VPk, edges, tuple(layer_inputs), microbatches, arrays)
    return loss_sum, jax.tree.map(lambda x: x.reshape(L, *x.shape[3:]), layer_grads), edge_grads
