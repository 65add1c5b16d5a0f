#!/usr/bin/env python3
"""Fault campaign: kill, corrupt and fuzz smoke runs of the real entry points, and tabulate what happened.

  python scripts/fault_check.py                       # every kind, 2 trials each (~10 min on 2 cores)
  python scripts/fault_check.py --trials=10 --seed=1  # more trials of the randomised kinds
  python scripts/fault_check.py --kinds=sigkill,flip_bytes --trials=1 --out=/tmp/reliability

Each trial runs experiments/train_lm.py (configs/lm.py:smoke, 12 steps, a checkpoint every 3, all kept)
or experiments/train_marl.py (configs/marl.py:smoke, 40 updates, a checkpoint every 10) as a subprocess on 8
simulated CPU devices, injects one fault, and reruns the same command where a user would. Kinds:

  sigkill, sigterm     the signal at a random time (uniform over an uninterrupted run), then the rerun
  marl_sigkill         SIGKILL of the MARL run at a random time, then the rerun
  flip_bytes, truncate, delete_metadata, delete_item, bad_data_json
                       damage to the newest checkpoint (step 9 of 3, 6, 9) of a finished run, then the rerun;
                       each again with --config.checkpoint.on_corrupt=fallback where the config has that key
  bad_config           out-of-range values (one case per trial, every case once)
  misspelled_override  --config.mesh.dta=2 and the like (every case once)
  bad_tokens           tokens corpora with ids past the vocabulary, the wrong dtype, a torn file (every case)
  two_runs             a second run started on the workdir of a live one

Outcomes: "clean error" (exit code != 0, the last line an `error:` message, no traceback), "resumed
bitwise" (the rerun completes with the loss, grad norm and lr of every step equal, as floats, to an
uninterrupted run), "fallback" (completes bitwise after announcing it fell back to an earlier checkpoint),
"crash" (exit code != 0 with a traceback, or killed), "wrong" (completes with other numbers, or accepts a
bad input and trains), "hang" (no exit within the time limit), "finished first" (the signal came after the
run had ended: no fault injected). "Nothing lost": every checkpoint that was complete before the fault
(except the one damaged on purpose) still restores afterwards, and no checkpoint file has disappeared (a
damaged step may be moved, not deleted).

Writes OUT/results.json (every trial) and OUT/README.md (the table, the machine, the versions) and prints
the table. Every run is limited to 8 GiB of address space, so an absurd size that no check catches fails
instead of exhausting a shared machine. Runs share a JAX compilation cache in the scratch folder (the same
programs, compiled once).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import logging as absl_logging

from jaxpar import machine
from jaxpar.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OUTCOMES = (
    "clean error",
    "resumed bitwise",
    "fallback",
    "crash",
    "wrong",
    "hang",
    "finished first",
)
LM_STEPS, LM_EVERY, MARL_UPDATES, MARL_EVERY = 12, 3, 40, 10
LM_ARGS = [
    f"--config.train.steps={LM_STEPS}",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    f"--config.train.checkpoint_every={LM_EVERY}",
    "--config.train.keep_checkpoints=100",
]
MARL_ARGS = [
    f"--config.train.total_env_steps={64 * 25 * MARL_UPDATES}",
    "--config.train.updates_per_call=1",
    f"--config.train.checkpoint_every={MARL_EVERY}",
    "--config.train.keep_checkpoints=100",
]
MARL_TIMING = ("env_steps_per_s", "wall_s", "compile_s", "cpu_s")
TIMEOUT_S = 300
ADDRESS_SPACE = 8 << 30
CORRUPTIONS = ("flip_bytes", "truncate", "delete_metadata", "delete_item", "bad_data_json")
BAD_CONFIG = [
    ["--config.optimizer.grad_clip_norm=-1.0"],
    ["--config.optimizer.b1=1.5"],
    ["--config.optimizer.b2=-0.5"],
    ["--config.optimizer.weight_decay=-0.1"],
    ["--config.optimizer.warmup_steps=1000"],  # 12 steps: lr would stay under 1.1% of its peak
    ["--config.optimizer.learning_rate=inf"],
    ["--config.model.norm_eps=-1e-5"],
    ["--config.optimizer.eps=0.0", "--config.optimizer.b2=-1.0"],
    ["--config.train.global_batch=6"],
    ["--config.mesh.data=3"],
    ["--config.model.n_layers=100000"],
    ["--config.train.global_batch=1048576"],
]
MISSPELLED = [["--config.mesh.dta=2"], ["--config.train.stpes=10"], ["--config.optimizer.learnig_rate=1e-3"]]
BAD_TOKENS = ("ids_past_vocab", "uint16_read_as_uint32", "uint32_read_as_uint16", "torn_file")
WANTED = {
    "sigkill": "resumed bitwise",
    "sigterm": "resumed bitwise",
    "marl_sigkill": "resumed bitwise",
    **{kind: "clean error" for kind in CORRUPTIONS},
    **{f"{kind}+fallback": "fallback" for kind in CORRUPTIONS},
    "bad_config": "clean error",
    "misspelled_override": "clean error",
    "bad_tokens": "clean error",
    "two_runs": "clean error",
}


# --- running the entry points ------------------------------------------------------------------------


class Campaign:
    def __init__(self, scratch: str, rng: random.Random):
        self.scratch = scratch
        self.rng = rng
        self.env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": os.path.join(scratch, "jax_cache"),
        }
        self.count = 0
        self.references: dict[str, dict] = {}
        self._abstract: dict[str, object] = {}

    def folder(self, name: str) -> str:
        self.count += 1
        path = os.path.join(self.scratch, f"{self.count:03d}_{name}")
        os.makedirs(path)
        return path

    @staticmethod
    def command(family: str, workdir: str, *overrides: str) -> list[str]:
        entry, config, base = {
            "lm": ("train_lm.py", "lm.py", LM_ARGS),
            "marl": ("train_marl.py", "marl.py", MARL_ARGS),
        }[family]
        return [
            sys.executable,
            os.path.join(ROOT, "experiments", entry),
            f"--config={os.path.join(ROOT, 'configs', config)}:smoke",
            f"--workdir={workdir}",
            *base,
            *overrides,
        ]

    def start(self, cmd: list[str], log_dir: str, name: str) -> subprocess.Popen:
        out = open(os.path.join(log_dir, f"{name}.out"), "w")
        err = open(os.path.join(log_dir, f"{name}.err"), "w")
        # The limit through the shell (exec keeps the pid): a preexec_fn would fork this multithreaded
        # process (jax) in Python.
        limited = ["/bin/sh", "-c", f'ulimit -v {ADDRESS_SPACE >> 10} && exec "$@"', "sh", *cmd]
        process = subprocess.Popen(limited, env=self.env, cwd=ROOT, stdout=out, stderr=err)
        process.logs = (out, err, time.time())
        return process

    @staticmethod
    def finish(process: subprocess.Popen, timeout: float = TIMEOUT_S) -> dict:
        out, err, started = process.logs
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.kill()
            process.wait()
        out.close()
        err.close()
        with open(out.name, errors="replace") as f:
            stdout = f.read()
        with open(err.name, errors="replace") as f:
            stderr = f.read()
        return {
            "rc": process.returncode,
            "timed_out": timed_out,
            "wall_s": round(time.time() - started, 2),
            "stdout": stdout,
            "stderr": stderr,
        }

    def run(self, cmd: list[str], log_dir: str, name: str, timeout: float = TIMEOUT_S) -> dict:
        return self.finish(self.start(cmd, log_dir, name), timeout)

    # --- what a run left behind ----------------------------------------------------------------------

    def abstract(self, family: str):
        """The abstract state the smoke runs save (steps and checkpoint periods do not change it)."""
        if family not in self._abstract:
            from configs import lm, marl
            from jaxpar.config import from_config_dict, validate_run
            from jaxpar.parallel.mesh import make_mesh
            from jaxpar.rl import config as rl_config, loop as rl_loop
            from jaxpar.train import build as build_lib

            if family == "lm":
                run = from_config_dict(lm.get_config("smoke"))
                program = build_lib.build(run, make_mesh(validate_run(run, jax.device_count())))
                self._abstract[family] = program.abstract
            else:
                self._abstract[family] = rl_loop.build(
                    rl_config.from_config_dict(marl.get_config("smoke"))
                ).abstract_state
        return self._abstract[family]

    def unrestorable(self, family: str, workdir: str, steps) -> list[str]:
        """The steps among `steps` that no longer restore, each with the first line of its error."""
        from jaxpar.train.checkpoint import Checkpointer

        failed = []
        for step in steps:
            checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=100)
            try:
                checkpointer.restore(step, self.abstract(family))
            except Exception as error:  # any failure to restore is a loss
                failed.append(f"{step}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            finally:
                checkpointer.close()
        return failed


def committed(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def checkpoint_files(workdir: str, only_committed: bool) -> collections.Counter:
    """(file name, size) of every checkpoint file: names of orbax's data files are content hashes, so a
    file moved elsewhere under checkpoints/ still counts as kept."""
    root = os.path.join(workdir, "checkpoints")
    files = collections.Counter()
    for step in committed(workdir) if only_committed else [""]:
        for directory, _, names in os.walk(os.path.join(root, str(step))):
            files.update((name, os.path.getsize(os.path.join(directory, name))) for name in names)
    return files


def lm_curve(workdir: str) -> dict:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(path) if "loss" in r}


def marl_curve(workdir: str) -> dict:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    return {r["step"]: {k: v for k, v in r.items() if k not in MARL_TIMING} for r in read_metrics(path)}


def failure(result: dict) -> tuple[str, str]:
    """(outcome, message) of a run that did not exit 0. Clean: the entry point's one `error:` message
    (sys.exit), no traceback anywhere."""
    if result["timed_out"]:
        return "hang", f"no exit after {result['wall_s']} s"
    lines = [line.strip() for line in result["stderr"].replace("\r", "\n").splitlines() if line.strip()]
    said = next((line for line in lines if line.startswith("error:")), None)
    if result["rc"] > 0 and said and "Traceback" not in result["stderr"]:
        return "clean error", said
    last = lines[-1] if lines else "no output"
    if result["rc"] < 0:
        return "crash", f"killed by signal {-result['rc']}; last line: {last[:200]}"
    traceback = result["stderr"].count("\n", result["stderr"].find("Traceback"))
    # The exception itself, not JAX's note about filtered frames that often follows it.
    raised = next((line for line in reversed(lines) if _EXCEPTION.match(line)), last)
    return "crash", f"exit {result['rc']}, traceback of {traceback} lines; raised: {raised[:300]}"


_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


_FELL_BACK = re.compile(r"\b(is|are) corrupt|f[ae]ll(s|ing)? back|resuming from step", re.IGNORECASE)
_PATH = re.compile(r"\S*/\S*")
_LOG_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ")


def completed(result: dict, curve: dict, reference: dict) -> tuple[str, str]:
    """(outcome, message) of a rerun that should have completed the reference run."""
    if result["rc"] != 0:
        return failure(result)
    if curve != reference:
        differing = sorted(s for s in set(curve) | set(reference) if curve.get(s) != reference.get(s))
        return "wrong", f"completed, but steps {differing[:8]} differ from the uninterrupted run"
    lines = (result["stdout"] + result["stderr"]).splitlines()
    said = [x.strip() for x in lines if _FELL_BACK.search(_PATH.sub("", x))]
    if said:  # completed bitwise, having said that a checkpoint was corrupt: it fell back to another
        return "fallback", _LOG_PREFIX.sub("", said[0])[:200]
    return "resumed bitwise", "every step equal to the uninterrupted run"


def trial_record(kind: str, outcome: str, message: str, lost: list[str] | None, **details) -> dict:
    return {"kind": kind, "outcome": outcome, "message": message, "lost": lost, **details}


def nothing_lost(camp: Campaign, family: str, workdir: str, intact, files_before) -> list[str]:
    """What was lost: intact steps that no longer restore, and checkpoint files that disappeared."""
    lost = camp.unrestorable(family, workdir, intact)
    missing = files_before - checkpoint_files(workdir, only_committed=False)
    if missing:
        lost.append(f"{sum(missing.values())} checkpoint file(s) gone, e.g. {sorted(missing)[:3]}")
    return lost


# --- references --------------------------------------------------------------------------------------


def reference(camp: Campaign, family: str) -> dict:
    """Two uninterrupted runs (the second from the warm compilation cache): their curves must be equal, or
    no trial can be called bitwise; the second's wall time bounds the random fault times."""
    if family in camp.references:
        return camp.references[family]
    curve = lm_curve if family == "lm" else marl_curve
    runs = []
    for i in range(2):
        folder = camp.folder(f"reference_{family}_{i}")
        workdir = os.path.join(folder, "run")
        result = camp.run(camp.command(family, workdir), folder, "run")
        if result["rc"] != 0:
            sys.exit(f"error: the uninterrupted {family} run failed:\n{result['stderr'][-3000:]}")
        runs.append((workdir, result, curve(workdir)))
    ref = {
        "workdir": runs[0][0],
        "curve": runs[0][2],
        "wall_s": runs[1][1]["wall_s"],
        "reproducible": runs[0][2] == runs[1][2],
    }
    camp.references[family] = ref
    log(f"reference {family}: {ref['wall_s']} s warm, two runs equal: {ref['reproducible']}")
    return ref


# --- kinds -------------------------------------------------------------------------------------------


def signal_trial(camp: Campaign, kind: str, family: str, signum: int) -> dict:
    ref = reference(camp, family)
    folder = camp.folder(kind)
    workdir = os.path.join(folder, "run")
    at = camp.rng.uniform(0.0, ref["wall_s"])
    process = camp.start(camp.command(family, workdir), folder, "faulted")
    try:
        process.wait(timeout=at)
    except subprocess.TimeoutExpired:
        pass
    if process.poll() is not None:
        camp.finish(process)
        return trial_record(kind, "finished first", f"exited before the signal at {at:.1f} s", None, at_s=at)
    files_before = checkpoint_files(workdir, only_committed=True)
    intact = committed(workdir)
    logged = max((lm_curve if family == "lm" else marl_curve)(workdir), default=0)
    process.send_signal(signum)
    sent = time.time()
    faulted = camp.finish(process, timeout=120)
    exit_s = round(time.time() - sent, 2)
    details = dict(at_s=round(at, 2), logged_step=logged, checkpoints_before=intact, faulted_rc=faulted["rc"])
    if signum == signal.SIGTERM:
        details["exit_after_sigterm_s"] = exit_s
        if faulted["timed_out"]:
            return trial_record(kind, "hang", f"no exit 120 s after SIGTERM (at {at:.1f} s)", None, **details)
        if faulted["rc"] not in (0, -signal.SIGTERM):
            outcome, message = failure(faulted)
            return trial_record(kind, outcome, f"on SIGTERM: {message}", None, **details)
        # A checkpoint saved at the signal is as complete as any before it.
        files_before = checkpoint_files(workdir, only_committed=True)
        intact = committed(workdir)
        details["saved_on_sigterm"] = intact[-1] if faulted["rc"] == 0 and intact else None
    rerun = camp.run(camp.command(family, workdir), folder, "rerun")
    curve = (lm_curve if family == "lm" else marl_curve)(workdir)
    outcome, message = completed(rerun, curve, ref["curve"])
    details["stale_lock_warning"] = "stale lock" in rerun["stderr"]
    lost = nothing_lost(camp, family, workdir, intact, files_before)
    return trial_record(kind, outcome, message, lost, **details)


def _largest_array_file(step_dir: str) -> str:
    files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(step_dir, "state")) for f in names]
    data = [p for p in files if os.sep + "d" + os.sep in p]
    return max(data or files, key=os.path.getsize)


def damage(kind: str, step_dir: str, rng: random.Random) -> str:
    """Damages one checkpoint step in place; returns what was done."""
    if kind == "flip_bytes":
        path = _largest_array_file(step_dir)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            spots = sorted(rng.randrange(size) for _ in range(rng.choice((1, 4, 16))))
            for spot in spots:
                f.seek(spot)
                byte = f.read(1)[0]
                f.seek(spot)
                f.write(bytes([byte ^ (1 << rng.randrange(8))]))
        return f"flipped a bit in {len(spots)} byte(s) of {os.path.relpath(path, step_dir)} ({size} bytes)"
    if kind == "truncate":
        path = _largest_array_file(step_dir)
        size = os.path.getsize(path)
        keep = rng.randrange(size)
        os.truncate(path, keep)
        return f"truncated {os.path.relpath(path, step_dir)} from {size} to {keep} bytes"
    if kind == "delete_metadata":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
        return "deleted state/_METADATA"
    if kind == "delete_item":
        item = rng.choice(["state", "data"])
        shutil.rmtree(os.path.join(step_dir, item))
        return f"deleted the {item} folder"
    if kind == "bad_data_json":
        path = os.path.join(step_dir, "data", "metadata")
        position = json.load(open(path))
        variant = rng.choice(["wrong keys", "plausible but wrong", "not json"])
        with open(path, "w") as f:
            if variant == "wrong keys":
                json.dump({"position": 3, "epoch": 0}, f)
            elif variant == "plausible but wrong":
                position["counter"] = position.get("counter", 0) + 7
                if isinstance(position.get("parent"), dict):
                    position["parent"]["next_index"] = position["parent"].get("next_index", 0) + 7
                json.dump(position, f)
            else:
                f.write('{"parent": {"next_ind')
        return f"data position: {variant}"
    raise ValueError(kind)


def corruption_trial(camp: Campaign, kind: str, fallback: bool) -> dict:
    ref = reference(camp, "lm")
    name = kind + ("+fallback" if fallback else "")
    folder = camp.folder(kind + ("_fb" if fallback else ""))  # no "fallback" in paths the output names
    workdir = os.path.join(folder, "run")
    # The finished reference run as it stood before its last checkpoint (steps 3, 6, 9 saved).
    shutil.copytree(ref["workdir"], workdir, ignore=shutil.ignore_patterns(str(LM_STEPS), "tensorboard"))
    steps = committed(workdir)
    victim = steps[-1]
    what = damage(kind, os.path.join(workdir, "checkpoints", str(victim)), camp.rng)
    files_before = checkpoint_files(workdir, only_committed=True)
    overrides = ["--config.checkpoint.on_corrupt=fallback"] if fallback else []
    rerun = camp.run(camp.command("lm", workdir, *overrides), folder, "rerun")
    outcome, message = completed(rerun, lm_curve(workdir), ref["curve"])
    lost = nothing_lost(camp, "lm", workdir, steps[:-1], files_before)
    return trial_record(name, outcome, message, lost, damaged_step=victim, damage=what)


def fuzz_trial(camp: Campaign, kind: str, case: str, overrides=(), setup=None) -> dict:
    """A bad input: it should be refused with a clean error before anything is saved (nothing saved
    before, so nothing to lose: n/a)."""
    folder = camp.folder(kind)
    workdir = os.path.join(folder, "run")
    overrides = [*(setup(folder) if setup else []), *overrides]
    result = camp.run(camp.command("lm", workdir, *overrides), folder, "run", timeout=180)
    if result["rc"] == 0:
        outcome, message = "wrong", f"accepted: trained to the end and saved steps {committed(workdir)}"
    else:
        outcome, message = failure(result)
    return trial_record(kind, outcome, message, None, case=case, wall_s=result["wall_s"])


def token_corpus(case: str):
    """Writes a 3-document byte-id corpus as `case` damages it; returns the data overrides."""

    def setup(folder: str) -> list[str]:
        ids = np.random.default_rng(0).integers(0, 256, size=3 * 65536)
        dtype, written = "uint16", np.uint16
        if case == "ids_past_vocab":
            ids[12345] = 300  # model.vocab_size is 256
        elif case == "uint16_read_as_uint32":
            dtype = "uint32"
        elif case == "uint32_read_as_uint16":
            written = np.uint32
        path = os.path.join(folder, "corpus.bin")
        ids.astype(written).tofile(path)
        if case == "torn_file":
            with open(path, "ab") as f:
                f.write(b"\x01")
        return [
            "--config.data.source=tokens",
            f"--config.data.path={path}",
            f"--config.data.token_dtype={dtype}",
        ]

    return setup


def two_runs_trial(camp: Campaign) -> dict:
    folder = camp.folder("two_runs")
    workdir = os.path.join(folder, "run")
    long_run = ["--config.train.steps=400"]
    first = camp.start(camp.command("lm", workdir, *long_run), folder, "first")
    deadline = time.time() + TIMEOUT_S
    while not lm_curve(workdir) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if first.poll() is not None:
        result = camp.finish(first)
        return trial_record("two_runs", *failure(result), None, case="the first run failed on its own")
    second = camp.run(camp.command("lm", workdir, *long_run), folder, "second", timeout=180)
    first_alive = first.poll() is None
    intact, files_before = committed(workdir), checkpoint_files(workdir, only_committed=True)
    first.send_signal(signal.SIGTERM)
    first_result = camp.finish(first, timeout=120)
    if second["rc"] == 0:
        outcome, message = "wrong", "the second run trained on the same workdir"
    else:
        outcome, message = failure(second)
    lost = nothing_lost(camp, "lm", workdir, intact, files_before)
    if not first_alive or first_result["rc"] != 0:
        lost.append(f"the first run did not survive the second (exit {first_result['rc']})")
    return trial_record("two_runs", outcome, message, lost, first_rc=first_result["rc"])


def has_on_corrupt() -> bool:
    from jaxpar.config import RunConfig

    return "checkpoint" in RunConfig.__dataclass_fields__


def plan(kinds: list[str], trials: int):
    """(kind, thunk) per trial, in the order they run."""
    out = []
    for kind in kinds:
        if kind == "sigkill":
            out += [(kind, lambda c: signal_trial(c, "sigkill", "lm", signal.SIGKILL))] * trials
        elif kind == "sigterm":
            out += [(kind, lambda c: signal_trial(c, "sigterm", "lm", signal.SIGTERM))] * trials
        elif kind == "marl_sigkill":
            out += [(kind, lambda c: signal_trial(c, "marl_sigkill", "marl", signal.SIGKILL))] * trials
        elif kind in CORRUPTIONS:
            out += [(kind, lambda c, k=kind: corruption_trial(c, k, False))] * trials
            if has_on_corrupt():
                out += [(f"{kind}+fallback", lambda c, k=kind: corruption_trial(c, k, True))] * trials
        elif kind in ("bad_config", "misspelled_override"):
            cases = BAD_CONFIG if kind == "bad_config" else MISSPELLED
            out += [(kind, lambda c, k=kind, o=o: fuzz_trial(c, k, " ".join(o), o)) for o in cases]
        elif kind == "bad_tokens":
            out += [
                (kind, lambda c, t=t: fuzz_trial(c, "bad_tokens", t, setup=token_corpus(t)))
                for t in BAD_TOKENS
            ]
        elif kind == "two_runs":
            out += [(kind, two_runs_trial)] * trials
        else:
            sys.exit(f"error: unknown kind {kind!r}; choose from {', '.join(ALL_KINDS)}.")
    return out


ALL_KINDS = (
    "sigkill",
    "sigterm",
    "marl_sigkill",
    *CORRUPTIONS,
    "bad_config",
    "misspelled_override",
    "bad_tokens",
    "two_runs",
)


# --- report ------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[fault_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def summarise(records: list[dict]) -> dict:
    kinds: dict[str, dict] = {}
    for r in records:
        k = kinds.setdefault(
            r["kind"],
            {
                "trials": 0,
                "outcomes": dict.fromkeys(OUTCOMES, 0),
                "wanted": WANTED[r["kind"]],
                "checked": 0,
                "nothing_lost": 0,
            },
        )
        k["trials"] += 1
        k["outcomes"][r["outcome"]] += 1
        if r["lost"] is not None:
            k["checked"] += 1
            k["nothing_lost"] += not r["lost"]
    return kinds


def _note(kind: str, records: list[dict]) -> str:
    mine = [r for r in records if r["kind"] == kind]
    notes = []
    if kind == "sigterm":
        latencies = [r["exit_after_sigterm_s"] for r in mine if "exit_after_sigterm_s" in r]
        if latencies:
            notes.append(f"exit {max(latencies):.1f} s after SIGTERM at most")
    unwanted = [r for r in mine if r["outcome"] != WANTED[kind]]
    for example in unwanted[:3] or mine[:1]:
        case = f"{example['case']}: " if example.get("case") else ""
        said = "e.g. " if not unwanted else f"{example['outcome']}: "
        notes.append(said + (case + example["message"]).replace("|", "/")[:150])
    lost = [x for r in mine for x in (r["lost"] or [])]
    if lost:
        notes.append("lost: " + lost[0][:120].replace("|", "/"))
    return "; ".join(notes)


def table(summary: dict, records: list[dict]) -> str:
    head = ["kind", "trials", "wanted", *OUTCOMES, "nothing lost", "notes"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for kind, k in summary.items():
        lost = f"{k['nothing_lost']}/{k['checked']}" if k["checked"] else "n/a"
        cells = [kind, str(k["trials"]), k["wanted"], *(str(k["outcomes"][o] or "") for o in OUTCOMES)]
        rows.append("| " + " | ".join([*cells, lost, _note(kind, records)]) + " |")
    return "\n".join(rows)


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def git_head() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def write_report(out: str, args, records: list[dict], camp: Campaign, wall_s: float) -> str:
    summary = summarise(records)
    machine_info = machine.describe()
    refs = {f: {"wall_s": r["wall_s"], "reproducible": r["reproducible"]} for f, r in camp.references.items()}
    result = {
        "command": " ".join(["python", "scripts/fault_check.py", *sys.argv[1:]]),
        "trials": args.trials,
        "seed": args.seed,
        "machine": machine_info,
        "machine_summary": machine.summary(machine_info),
        "load_average": os.getloadavg(),
        "versions": versions(),
        "git": git_head(),
        "wall_s": round(wall_s, 1),
        "references": refs,
        "kinds": summary,
        "records": records,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    markdown = table(summary, records)
    ref_line = "; ".join(
        f"{family} uninterrupted run {r['wall_s']} s (warm cache); two such runs bitwise equal: "
        f"{r['reproducible']}"
        for family, r in refs.items()
    )
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(
            "# Reliability: the fault campaign\n\n"
            f"Generated by `{result['command']}` on {datetime.date.today()} in {wall_s / 60:.1f} min "
            f"(code: {result['git']}). Every trial in results.json; what the kinds and outcomes mean: the "
            "docstring of scripts/fault_check.py.\n\n"
            f"Machine: {result['machine_summary']}; load average {result['load_average'][0]:.1f}. Versions: "
            + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
            + f".\n\nReferences: {ref_line or 'none'}.\n\n"
            + markdown
            + "\n\n`wanted`: the outcome the house promises for that kind. `nothing lost`: trials in which "
            "every checkpoint complete before the fault (but the one damaged on purpose) still restores and "
            "no checkpoint file disappeared, of the trials that had checkpoints to check.\n"
        )
    return markdown


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=2, help="trials per randomised kind (default 2)")
    parser.add_argument("--kinds", default=",".join(ALL_KINDS), help="comma-separated subset of the kinds")
    parser.add_argument("--seed", type=int, default=0, help="seeds fault times and damage")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "reliability"))
    parser.add_argument("--scratch", default=None, help="folder for the runs (default: a fresh temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders")
    args = parser.parse_args()
    if args.trials < 1:
        sys.exit(f"error: --trials={args.trials}; use at least 1.")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    machine.simulate_cpu_devices(8)  # for the restore checks, on the mesh the runs saved from
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns about every damaged step it lists
    sys.path.insert(0, ROOT)  # configs/
    scratch = args.scratch or tempfile.mkdtemp(prefix="fault_check_")
    os.makedirs(scratch, exist_ok=True)
    camp = Campaign(scratch, random.Random(args.seed))
    started = time.time()
    records = []
    trials = plan(kinds, args.trials)
    try:
        for i, (kind, trial) in enumerate(trials, 1):
            t0 = time.time()
            record = trial(camp)
            record["message"] = record["message"].replace(scratch, "$SCRATCH")
            record["trial_s"] = round(time.time() - t0, 1)
            records.append(record)
            lost = "" if not record["lost"] else f"; LOST {record['lost']}"
            log(f"{i}/{len(trials)} {kind}: {record['outcome']} ({record['message'][:120]}){lost}")
    finally:
        if records:
            print(write_report(args.out, args, records, camp, time.time() - started))
            print(f"wrote {os.path.join(args.out, 'results.json')} and README.md", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"runs kept in {scratch}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
