"""Pipeline schedule tables (pure Python, the full grid): every generated table is valid, its bubble
equals the published formula, 1F1B bounds the stash by P, validation rejects broken tables, and the
executor's index arrays (pipeline.lower) deliver every activation and gradient to the right action."""

import dataclasses
import itertools

import numpy as np
import pytest

from jaxpar.parallel import pipeline, schedules
from jaxpar.parallel.schedules import Action, Schedule, ScheduleError
from jaxpar.train.costs import expected_ppermute_bytes


def grid():
    """Every schedule, P in {2, 4} (and 3, 8 for the formulas), V in {1, 2} (and 3) where the schedule
    takes virtual stages, M in {P, 2P, 4P}, fused and split backward."""
    for name, P, M_factor in itertools.product(schedules.SCHEDULES, (2, 3, 4, 8), (1, 2, 4)):
        for V in (1, 2, 3) if name in ("gpipe", "interleaved_1f1b") else (1,):
            for split in (False, True) if name != "zero_bubble" else (True,):
                yield name, P, V, M_factor * P, split


GRID = list(grid())


@pytest.mark.parametrize("name,P,V,M,split", GRID)
def test_tables_are_valid_and_match_the_bubble_formula(name, P, V, M, split):
    schedule = schedules.make_schedule(name, P, M, V, split_backward=split)
    schedule.validate()
    assert schedule.split_backward == split
    theory = schedules.theoretical_bubble(name, P, M, V, split_backward=split)
    assert schedule.bubble_fraction() == pytest.approx(theory, abs=1e-12)
    # Every stage does every action of its chunks exactly once (validate checks it; count anyway).
    per_stage = (3 if split else 2) * M * V
    for stage in range(P):
        assert sum(1 for _, s, _ in schedule.actions() if s == stage) == per_stage
    # Splitting the backward changes neither the order of forwards nor the stash peak.
    if split and name != "zero_bubble":
        fused = schedules.make_schedule(name, P, M, V)
        assert schedule.peak_in_flight() == fused.peak_in_flight()


@pytest.mark.parametrize("P,M", [(2, 8), (4, 16), (4, 32), (8, 32)])
def test_1f1b_bounds_the_stash_by_p_and_gpipe_by_m(P, M):
    gpipe = schedules.make_schedule("gpipe", P, M)
    one_f_one_b = schedules.make_schedule("1f1b", P, M)
    zero_bubble = schedules.make_schedule("zero_bubble", P, M)
    assert gpipe.peak_in_flight() == [M] * P
    assert one_f_one_b.peak_in_flight() == [P - s for s in range(P)]
    assert max(zero_bubble.peak_in_flight()) == P  # ZB-H1 keeps 1F1B's peak
    # Interleaving trades memory for bubble: below GPipe's M*V chunk stashes once M > P.
    interleaved = schedules.make_schedule("interleaved_1f1b", P, M, 2)
    assert max(interleaved.peak_in_flight()) < 2 * M
    assert interleaved.bubble_fraction() < one_f_one_b.bubble_fraction()


def test_interleaved_with_one_chunk_is_1f1b():
    a = schedules.make_schedule("interleaved_1f1b", 4, 8, 1)
    b = schedules.make_schedule("1f1b", 4, 8)
    assert a.table == b.table


def test_lockstep_time_at_equal_work():
    """With F = B = W (a fused backward is one action of cost 2): ZB-H1 spends 3M + P - 1 units and 1F1B
    with a split backward 3M + 2(P - 1); fused 1F1B in lockstep spends more than its textbook
    3(M + P - 1), because ticks mixing a forward with a backward last as long as the backward."""
    for P, M in [(2, 4), (4, 8), (4, 16), (8, 16)]:
        unit = {"F": 1, "B": 1, "W": 1}
        assert schedules.make_schedule("zero_bubble", P, M).lockstep_time(unit) == 3 * M + P - 1
        split = schedules.make_schedule("1f1b", P, M, split_backward=True)
        assert split.lockstep_time(unit) == 3 * M + 2 * (P - 1)
        fused = schedules.make_schedule("1f1b", P, M)
        assert fused.lockstep_time({"F": 1, "B": 2}) > 3 * (M + P - 1)


def test_tables_are_deterministic():
    assert schedules.make_schedule("zero_bubble", 4, 8) == schedules.make_schedule("zero_bubble", 4, 8)


# --- validation rejects broken tables -------------------------------------------------------------


def _with(schedule: Schedule, table) -> Schedule:
    return dataclasses.replace(schedule, table=tuple(tuple(row) for row in table))


def test_validation_rejects_a_forward_before_its_input_arrives():
    s = schedules.make_schedule("1f1b", 2, 2)
    table = [list(row) for row in s.table]
    # Stage 1 runs F0 in tick 1 (one tick after stage 0); moving it to tick 0 breaks the dependency.
    assert table[1][1] == Action("F", 0, 0) and table[0][1] is None
    table[0][1], table[1][1] = table[1][1], None
    with pytest.raises(ScheduleError, match=r"needs F0 of global stage 0 at an earlier tick"):
        _with(s, table).validate()


def test_validation_rejects_a_backward_in_the_same_tick_as_its_gradient_source():
    s = schedules.make_schedule("gpipe", 2, 2)
    table = [list(row) for row in s.table]
    tick_b1 = next(t for t, st, a in s.actions() if st == 1 and a == Action("B", 0, 0))
    tick_b0 = next(t for t, st, a in s.actions() if st == 0 and a == Action("B", 0, 0))
    table[tick_b0][0] = None
    table[tick_b1][0] = Action("B", 0, 0)  # same tick as stage 1's B0: the gradient is not there yet
    with pytest.raises(ScheduleError, match="needs B0 of global stage 1"):
        _with(s, table).validate()


def test_validation_rejects_missing_duplicate_and_misplaced_actions():
    s = schedules.make_schedule("1f1b", 2, 2)
    table = [list(row) for row in s.table]
    last = len(table) - 1
    dropped = table[last][0]
    table[last][0] = None
    with pytest.raises(ScheduleError, match="never run"):
        _with(s, table).validate()
    table[last][0] = dropped
    table.append([dropped, None])
    with pytest.raises(ScheduleError, match="already ran"):
        _with(s, table).validate()
    table.pop()
    table[last][0] = Action("F", 0, 1)  # a chunk this 1-chunk schedule does not have
    with pytest.raises(ScheduleError, match="chunk"):
        _with(s, table).validate()


def test_validation_rejects_weight_gradients_without_split_backward_and_w_before_b():
    s = schedules.make_schedule("zero_bubble", 2, 2)
    with pytest.raises(ScheduleError, match="split_backward"):
        dataclasses.replace(s, split_backward=False).validate()
    table = [list(row) for row in s.table]
    ((tb, sb),) = [(t, st) for t, st, a in s.actions() if st == 0 and a == Action("B", 1, 0)]
    ((tw, sw),) = [(t, st) for t, st, a in s.actions() if st == 0 and a == Action("W", 1, 0)]
    table[tb][0], table[tw][0] = table[tw][0], table[tb][0]
    with pytest.raises(ScheduleError, match="needs B1 of global stage 0"):
        _with(s, table).validate()


def test_unknown_schedule_and_bad_virtual_stages_are_clear():
    with pytest.raises(ScheduleError, match="unknown"):
        schedules.make_schedule("pipedream", 2, 4)
    with pytest.raises(ScheduleError, match="interleaved_1f1b"):
        schedules.make_schedule("1f1b", 2, 4, 2)
    with pytest.raises(ScheduleError, match="multiple of stages"):
        schedules.make_schedule("interleaved_1f1b", 4, 6, 2)


# --- the executor's index arrays, run symbolically ----------------------------------------------------


def run_symbolically(program: pipeline.TickProgram):
    """Interpret the index arrays the way the executor does, moving labels instead of tensors: every F
    must read the activation of its own microbatch from the previous global stage, every B the gradient
    of its own microbatch from the next, every W the stash of its own B."""
    s = program.schedule
    P, V, G = s.num_stages, s.virtual_stages, s.num_global_stages
    fwd_inbox = [[None] * (program.num_fwd_inbox + 1) for _ in range(P)]
    bwd_inbox = [[None] * (program.num_bwd_inbox + 1) for _ in range(P)]
    stash = [[None] * program.num_stash for _ in range(P)]
    forward_pairs = dict(pipeline.ring_pairs(P, V, True))
    backward_pairs = dict(pipeline.ring_pairs(P, V, False))
    emb_seen, head_seen, embgrad_seen = set(), set(), set()
    for t in range(s.num_ticks):
        y, gx = [None] * P, [None] * P
        for st in range(P):
            kind, m, v = program.kind[t, st], program.microbatch[t, st], program.chunk[t, st]
            g = v * P + st
            slot, inbox = program.stash_slot[t, st], program.inbox_slot[t, st]
            if kind == pipeline.FWD:
                if g == 0:
                    assert program.emb_mb[t] == m
                    emb_seen.add(m)
                else:
                    assert fwd_inbox[st][inbox] == ("act", m, g - 1), (t, st)
                assert stash[st][slot] is None, f"tick {t} stage {st}: stash slot {slot} still in use"
                stash[st][slot] = ("stash", m, g)
                y[st] = ("act", m, g)
            elif kind == pipeline.BWD:
                assert bwd_inbox[st][inbox] == ("grad", m, g + 1), (t, st)
                assert stash[st][slot] == ("stash", m, g)
                if not s.split_backward:
                    stash[st][slot] = None
                gx[st] = ("grad", m, g)
                if g == 0:
                    assert program.embgrad_mb[t] == m
                    embgrad_seen.add(m)
            elif kind == pipeline.WGT:
                assert stash[st][slot] == ("stash", m, g)
                stash[st][slot] = None
        if program.head_mb[t] >= 0:
            m = program.head_mb[t]
            assert y[P - 1] == ("act", m, G - 1)
            bwd_inbox[P - 1][program.head_slot[t]] = ("grad", m, G)
            head_seen.add(m)
        if program.fwd_comm[t]:
            for src, dst in forward_pairs.items():
                fwd_inbox[dst][program.fwd_recv[t, dst]] = y[src]
        if program.bwd_comm[t]:
            for src, dst in backward_pairs.items():
                bwd_inbox[dst][program.bwd_recv[t, dst]] = gx[src]
    M = s.microbatches
    assert emb_seen == head_seen == embgrad_seen == set(range(M))
    assert all(slot is None for stage in stash for slot in stage)


@pytest.mark.parametrize("name,P,V,M,split", [case for case in GRID if case[1] in (2, 4) and case[2] < 3])
def test_lowered_program_delivers_every_tensor_to_its_action(name, P, V, M, split):
    schedule = schedules.make_schedule(name, P, M, V, split_backward=split)
    program = pipeline.lower(schedule)
    assert program.num_stash == max(schedule.peak_in_flight())
    run_symbolically(program)


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "zb.png"
    schedules.plot(schedules.make_schedule("zero_bubble", 4, 8), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ppermute_accounting():
    program = pipeline.lower(schedules.make_schedule("gpipe", 4, 8))
    expected = expected_ppermute_bytes(program, act_bytes=100)
    # GPipe: forwards leave stages 0..2 in ticks 0..9, backwards leave stages 3..1 in ticks 11..20.
    assert expected["forward"] == expected["backward"] == 10 * 100
    assert expected["useful"] == 2 * 8 * 3 * 100 / 4
    assert np.array_equal(program.fwd_comm[:10], np.ones(10, bool))
