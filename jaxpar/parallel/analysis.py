"""Facts read off compiled programs (collective bytes, matmul FLOPs, memory) and the analytic
expectations the collective bytes are checked against.

Byte convention (used by the parser and by every formula below): each collective is charged the size
of the FULL buffer one device holds on the wide side of the operation, per device, per step:

    all-gather          result bytes   (the gathered buffer; operand x group size)
    reduce-scatter      operand bytes  (the un-reduced buffer before scattering)
    all-reduce          operand bytes  (= result bytes)
    all-to-all          operand bytes  (= result bytes)
    collective-permute  operand bytes  (= result bytes)

This is the number the formulas are naturally written in (a layer's weights, an activation of
B_local x T x D), independent of the algorithm, and it is the same for a reduce-scatter and for the
all-reduce + dynamic-slice that XLA:CPU compiles in its place. The bytes that cross a link are
smaller by a known factor on a ring of n devices: (n-1)/n for all-gather, reduce-scatter and
all-to-all, 2(n-1)/n for all-reduce, 1 for collective-permute; `CollectiveOp.wire_bytes` applies it.

Ops inside a while loop (the layer scan) are counted trip-count times; XLA records the trip count in
the loop's backend_config (`known_trip_count`). Async collectives count at their `-start` op only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxpar.config import ModelConfig, RunConfig
from jaxpar.train import state as state_lib, step as step_lib

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLEE = re.compile(r"\b(body|calls|to_apply|branch_computations|true_computation|false_computation)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")
_COMMENT = re.compile(r"/\*.*?\*/")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def _bytes_of(type_text: str) -> int:
    """Bytes of an HLO type (array or tuple); f8 types and other exotic dtypes are 1 byte."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(type_text):
        if dtype == "token":
            continue
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * _DTYPE_BYTES.get(dtype, 1)
    return int(total)


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective in the program: `bytes` per execution (module convention), `count` executions
    per step (the product of the trip counts of the loops around it)."""

    kind: str
    name: str
    bytes: int
    group_size: int
    count: int
    op_name: str

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.count

    @property
    def wire_bytes(self) -> int:
        """Bytes one device sends per step with ring algorithms (bandwidth-optimal lower bound)."""
        n = self.group_size
        factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(self.kind, (n - 1) / n)
        return int(self.total_bytes * factor)


@dataclasses.dataclass
class _Instruction:
    name: str
    type_text: str
    opcode: str
    rest: str  # operands and attributes


def _split_operands(rest: str) -> tuple[list[str], str]:
    """The top-level comma-separated operands of `op(...)` and the attribute text after the ')'."""
    depth, start, operands = 0, 0, []
    for i, ch in enumerate(rest):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                operands.append(rest[start:i])
                return [o.strip() for o in operands if o.strip()], rest[i + 1:]
            depth -= 1
        elif ch == "," and depth == 0:
            operands.append(rest[start:i])
            start = i + 1
    return [o.strip() for o in operands if o.strip()], ""


def _parse_computations(hlo: str) -> tuple[dict[str, list[_Instruction]], str]:
    """{computation name: instructions} and the name of the ENTRY computation."""
    computations, entry, current = {}, None, None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        instruction = _INSTRUCTION.match(_COMMENT.sub("", line))
        if instruction:
            computations[current].append(_Instruction(*instruction.groups()))
    if entry is None:
        raise ValueError("no ENTRY computation found; pass compiled.as_text() (or the compiled object).")
    return computations, entry


def _group_size(attributes: str, num_partitions: int) -> int:
    """Devices per replica group, from any of XLA's spellings: named-mesh `mesh['a'=2,'b'=4] {'b'}`
    (product of the listed axes), iota `[groups,size]<=[...]`, explicit `{{0,1},{2,3}}`, or a
    permute's `source_target_pairs`; no groups at all means every partition."""
    named = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attributes)
    if named:
        sizes = {axis: int(size) for axis, size in re.findall(r"'([^']+)'=(\d+)", named.group(1))}
        return math.prod(sizes[axis] for axis in re.findall(r"'([^']+)'", named.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
    if iota:
        return int(iota.group(2))
    explicit = re.search(r"replica_groups=\{\{([^}]*)\}", attributes)
    if explicit:
        return len(explicit.group(1).split(","))
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attributes)
    if pairs:
        return len(set(re.findall(r"\d+", pairs.group(1))))
    return num_partitions


def _kind(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    return base if base in KINDS else None


def _walk(compiled_or_hlo):
    """Yield (instruction, operand types by name, executions per step) for every instruction reachable
    from ENTRY: loop bodies multiply by their recorded trip count (once when XLA recorded none, a
    lower bound); fusions, calls and conditional branches by one."""
    hlo = compiled_or_hlo if isinstance(compiled_or_hlo, str) else compiled_or_hlo.as_text()
    computations, entry = _parse_computations(hlo)

    def visit(computation: str, count: int):
        types = {ins.name: ins.type_text for ins in computations.get(computation, [])}
        for ins in computations.get(computation, []):
            yield ins, types, count
            trip = _TRIP_COUNT.search(ins.rest)
            for role, callee in _CALLEE.findall(ins.rest):
                if role == "to_apply":  # reduction combiners: scalar code
                    continue
                factor = int(trip.group(1)) if role == "body" and trip else 1
                for name in re.findall(r"[\w.\-]+", callee):
                    yield from visit(name, count * factor)

    yield from visit(entry, 1)


def _operand_types(operands: list[str], types: Mapping[str, str]) -> list[str]:
    """Operand types, whether printed inline (`f32[2]{0} %x`) or only by name (`%x`)."""
    def one(operand: str) -> str:
        inline = operand.split("%")[0]
        return inline if _SHAPE.search(inline) else types.get(operand.lstrip("%"), "")

    return [one(operand) for operand in operands]


def collective_ops(compiled_or_hlo) -> list[CollectiveOp]:
    """Every collective of a compiled (SPMD-partitioned) program, with its bytes and its count per
    step."""
    hlo = compiled_or_hlo if isinstance(compiled_or_hlo, str) else compiled_or_hlo.as_text()
    partitions = re.search(r"num_partitions=(\d+)", hlo)
    num_partitions = int(partitions.group(1)) if partitions else 1
    ops = []
    for ins, types, count in _walk(hlo):
        kind = _kind(ins.opcode)
        if kind is None:
            continue
        operands, attributes = _split_operands(ins.rest)
        operand_bytes = sum(_bytes_of(t) for t in _operand_types(operands, types))
        group = _group_size(attributes, num_partitions)
        nbytes = operand_bytes * group if kind == "all-gather" else operand_bytes
        op_name = re.search(r'op_name="([^"]*)"', attributes)
        ops.append(CollectiveOp(kind, ins.name, nbytes, group, count, op_name.group(1) if op_name else ""))
    return ops


def matmul_flops(compiled_or_hlo) -> int:
    """FLOPs of every dot per device per step, loops counted trip-count times: 2 x result elements x
    contracted size. XLA's cost analysis counts a while body once, so it undercounts a scanned model
    by about its depth; this count does not. Elementwise work is left out (matmuls dominate), and so
    are library GEMMs that a GPU program calls as custom-calls: this reads XLA:CPU programs."""
    total = 0
    for ins, types, count in _walk(compiled_or_hlo):
        if ins.opcode != "dot":
            continue
        operands, attributes = _split_operands(ins.rest)
        lhs_type = _operand_types(operands, types)[0]
        lhs_dims = [int(d) for d in _SHAPE.search(lhs_type).group(2).split(",") if d]
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attributes).group(1)
        contracted = math.prod(lhs_dims[int(i)] for i in contracting.split(",") if i)
        result_dims = [int(d) for d in _SHAPE.search(ins.type_text).group(2).split(",") if d]
        total += 2 * math.prod(result_dims) * contracted * count
    return total


def _totals(kind_bytes) -> dict[str, int]:
    """{kind: bytes summed} for every kind in KINDS, plus "total", from (kind, bytes) pairs."""
    totals = dict.fromkeys(KINDS, 0)
    for kind, nbytes in kind_bytes:
        totals[kind] += nbytes
    totals["total"] = sum(totals[k] for k in KINDS)
    return totals


def collective_bytes(compiled_or_hlo) -> dict[str, int]:
    """Bytes per device per step by collective kind (module convention), plus "total"."""
    return _totals((op.kind, op.total_bytes) for op in collective_ops(compiled_or_hlo))


def memory(compiled) -> dict[str, int]:
    """Per-device memory of a compiled program, from XLA's buffer assignment. `peak_estimate` is
    arguments + outputs + temporaries - aliased (donated) bytes, the usual live-set upper bound."""
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    out["peak_estimate"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                            - out["alias_bytes"])
    return out


def flops(compiled) -> float:
    """FLOPs per device per step from XLA's cost analysis (a dict, or a one-element list of dicts on
    older jax versions). It counts a while-loop body once, so for the layer scan prefer
    `matmul_flops`."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0))


def compile_train_step(run: RunConfig, mesh: Mesh):
    """(compiled train step, abstract state), built as the training loop builds it but from abstract
    inputs only: nothing is allocated, so any model size compiles for any mesh of this process."""
    tx = state_lib.make_optimizer(run.optimizer, run.train.steps)
    schedule = state_lib.learning_rate_schedule(run.optimizer, run.train.steps)
    graphdef, abstract, shardings = state_lib.abstract_state(run.model, tx, mesh)
    train_step = step_lib.make_train_step(graphdef, tx, schedule, run.train.grad_accum_steps,
                                          shardings.params)
    shape = (run.train.global_batch, run.train.seq_len)
    batch = {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=step_lib.batch_sharding(mesh))
             for key in step_lib.BATCH_KEYS}
    with jax.set_mesh(mesh):
        compiled = step_lib.jit_train_step(train_step, mesh, shardings).lower(abstract, batch).compile()
    return compiled, abstract


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs with shardings (shard shapes,
    so replicated leaves count in full and sharded ones by their shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def state_bytes_per_device(abstract_state) -> dict[str, int]:
    """Parameter and optimizer-state bytes per device of a TrainState of ShapeDtypeStructs."""
    params = bytes_per_device(abstract_state.params)
    opt_state = bytes_per_device(abstract_state.opt_state)
    return {"params": params, "opt_state": opt_state, "total": params + opt_state}


# ---------------------------------------------------------------------------------------------------
# Analytic expectations.


@dataclasses.dataclass(frozen=True)
class Term:
    """One named communication of the analytic model: what moves, as which collective, how many bytes
    per device per step (module convention)."""

    name: str
    kind: str
    bytes: int


def expected_terms(model: ModelConfig, mesh_sizes: Mapping[str, int], global_batch: int, seq_len: int, *,
                   param_bytes: int | None = None, act_bytes: int | None = None,
                   reduce_scatter_as_all_reduce: bool = False) -> list[Term]:
    """The communications one train step of jaxpar's Llama needs on a data x fsdp x tensor mesh.

    Textbook terms (ZeRO-3 FSDP, data-parallel gradient all-reduce, Megatron tensor parallelism with
    sequence parallelism, vocab-parallel loss), each with the choice XLA's SPMD partitioner makes for
    this model where the textbook leaves one open, as read off the compiled HLO:

    - FSDP gathers each layer's weights twice: in the forward scan, and again in the backward scan
      (its residuals are the sharded parameter slices, not the gathered weights). Rematerialization
      adds no gather: the recomputed forward shares the backward's. The unembedding, outside the
      scan, is gathered once for both passes (with bf16 compute XLA gathers it twice: a known gap).
      Tied embeddings change nothing: the lookup and the unembedding communicate the table each.
    - Megatron-SP: per layer, all-gather the sequence shards into attention and into the MLP and
      reduce-scatter their outputs back (forward); the transposes of those in the backward. The input
      gradient is reduced once per column-parallel matmul (wq, wk, wv, w_gate, w_up: 5 per layer, not
      the 2 of a fused-QKV Megatron): GSPMD reduces each matmul's partial sum before they are added.
      With the gathered inputs saved (remat "none") the backward does not re-gather them; "save_dots"
      re-gathers them, "full" repeats all forward collectives.
    - The embedding lookup gathers the (fsdp/tensor-sharded) table, one mesh axis at a time, instead
      of Megatron's masked lookup + reduce-scatter of activations (cheaper whenever V*D*param bytes <
      B_local*T*D*act bytes). Its gradient is a full-size scatter-add on every device, all-reduced
      over the tensor axis, then over data x fsdp; XLA slices it to the shard only at the end.
      (Under FSDP alone XLA may instead gather the token ids and all-to-all the looked-up
      activations, forward and backward: a different route of about the same bytes.)
    - Norm scales are replicated, so their gradients are all-reduced over every axis that splits
      tokens, in the same two stages (tensor; data x fsdp).

    Weights and their gradients move in the parameter dtype, activations in the compute dtype, unless
    `param_bytes` / `act_bytes` say otherwise (the CPU backend has no bf16 arithmetic: float
    normalization upcasts bf16 values to f32, so there every collective moves 4-byte elements).
    Assumes one microbatch per step and untouched logical rules (jaxpar.parallel.rules.RULES).
    `reduce_scatter_as_all_reduce`: label reduce-scatters as all-reduces, as the CPU backend compiles
    them (GSPMD emits all-reduce + dynamic-slice; only GPU/TPU pipelines rewrite that pattern into a
    reduce-scatter). The bytes are the same under the module convention.
    """
    for axis, size in mesh_sizes.items():
        if axis not in ("data", "fsdp", "tensor") and size > 1:
            raise ValueError(f"mesh axis {axis}={size}: the analytic model covers data, fsdp and tensor "
                             "only.")
    d, f, t = (mesh_sizes.get(axis, 1) for axis in ("data", "fsdp", "tensor"))
    p = param_bytes or np.dtype(model.param_dtype).itemsize
    a = act_bytes or np.dtype(model.dtype).itemsize
    L, D, V, T = model.n_layers, model.d_model, model.vocab_size, seq_len
    layer_weights = p * (D * model.head_dim * (2 * model.n_heads + 2 * model.n_kv_heads) + 3 * D * model.d_ff)
    table = unembed = p * V * D  # tied or not, the table is used (and communicated) twice
    norms = p * D * (2 * L + 1)
    tokens_local = global_batch // (d * f) * T
    act = tokens_local * D * a
    token_stages = (t > 1) + (d * f > 1)  # reductions over sequence shards, then over batch shards
    rs = "all-reduce" if reduce_scatter_as_all_reduce else "reduce-scatter"
    ag, ar = "all-gather", "all-reduce"

    terms = []
    if f > 1:
        terms += [
            Term("fsdp: all-gather layer weights (forward scan)", ag, L * layer_weights // t),
            Term("fsdp: all-gather layer weights again (backward scan)", ag, L * layer_weights // t),
            Term("fsdp: all-gather unembedding (once, both passes)", ag, unembed // t),
            Term("fsdp: reduce-scatter layer and unembedding gradients", rs,
                 (L * layer_weights + unembed) // t),
        ]
    if d > 1:
        terms.append(Term("data: all-reduce layer and unembedding gradient shards", ar,
                          (L * layer_weights + unembed) // (f * t)))
    if t > 1:
        remat_gathers = {"none": 0, "save_dots": 2, "full": 2}[model.remat]
        remat_scatters = {"none": 0, "save_dots": 0, "full": 1}[model.remat]
        terms += [
            Term("tensor: all-gather sequence shards into attention and MLP (forward)", ag, 2 * L * act),
            Term("tensor: reduce-scatter attention and MLP outputs to sequence shards (forward)", rs,
                 2 * L * act),
            Term("tensor: all-gather output gradients (backward)", ag, 2 * L * act),
            Term("tensor: reduce-scatter input gradients, one per column-parallel matmul (backward)", rs,
                 5 * L * act),
            Term(f"tensor: all-gather sequence shards again (remat={model.remat})", ag,
                 remat_gathers * L * act),
            Term(f"tensor: reduce-scatter outputs again (remat={model.remat})", rs, remat_scatters * L * act),
            Term("tensor: all-gather final hidden states for the vocab-parallel unembedding", ag, act),
            Term("tensor: all-reduce the unembedding's input gradient", ar, act),
            Term("tensor: all-reduce max, sum-exp and target logit over vocab shards (loss)", ar,
                 3 * tokens_local * 4),
        ]
    if f * t > 1:
        terms.append(Term("embedding: all-gather the table for the lookup, one axis at a time", ag,
                          (table // t if f > 1 else 0) + (table if t > 1 else 0)))
    terms += [
        Term("embedding: all-reduce the full-size table gradient, per token-splitting stage", ar,
             table * token_stages),
        Term("norms: all-reduce replicated norm-scale gradients, per token-splitting stage", ar,
             norms * token_stages),
    ]
    return [term for term in terms if term.bytes]


def expected_collective_bytes(model: ModelConfig, mesh_sizes: Mapping[str, int], global_batch: int,
                              seq_len: int, **options) -> dict[str, int]:
    """`expected_terms` (same options) summed by kind, plus "total" (the keys of `collective_bytes`)."""
    return _totals((term.kind, term.bytes)
                   for term in expected_terms(model, mesh_sizes, global_batch, seq_len, **options))
