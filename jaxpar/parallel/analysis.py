"""Facts read off compiled programs: collective bytes, matmul FLOPs, memory. Model-free: the analytic
expectations these are checked against live in jaxpar.train.costs.

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
from collections.abc import Iterable, Mapping

import jax
import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "s4": 0.5,
    "u4": 0.5,
}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLEE = re.compile(
    r"\b(body|calls|to_apply|branch_computations|true_computation|false_computation)="
    r"(\{[^}]*\}|%?[\w.\-]+)"
)
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
                return [o.strip() for o in operands if o.strip()], rest[i + 1 :]
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


def totals_by_kind(kind_bytes: Iterable[tuple[str, int]]) -> dict[str, int]:
    """{kind: bytes summed} for every kind in KINDS, plus "total", from (kind, bytes) pairs."""
    totals = dict.fromkeys(KINDS, 0)
    for kind, nbytes in kind_bytes:
        totals[kind] += nbytes
    totals["total"] = sum(totals[k] for k in KINDS)
    return totals


def collective_bytes(compiled_or_hlo) -> dict[str, int]:
    """Bytes per device per step by collective kind (module convention), plus "total"."""
    return totals_by_kind((op.kind, op.total_bytes) for op in collective_ops(compiled_or_hlo))


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
    out["peak_estimate"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    return out


def flops(compiled) -> float:
    """FLOPs per device per step from XLA's cost analysis (a dict, or a one-element list of dicts on
    older jax versions). It counts a while-loop body once, so for the layer scan prefer
    `matmul_flops`."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0))


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
