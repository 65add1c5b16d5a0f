"""Targets on this machine: `local` (one process) and `multiprocess` (N processes joined by
`jax.distributed.initialize` on 127.0.0.1, each with its own CPU devices; collectives go through gloo).

The multiprocess launcher is a small supervisor: it starts the processes, logs each one to
`WORKDIR/logs/process_<i>.log` (process 0 is echoed live), forwards SIGTERM/SIGINT to all of them (so a
preemption checkpoints, as on a cluster), and when one process dies it gives the others `grace` seconds to
notice (JAX's coordination service aborts them after the heartbeat timeout) before it terminates them
itself, then reports what happened to each.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxpar.launch import distributed
from jaxpar.launch.job import Job, write_launch_record, write_status


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


_signalled: int | None = None  # the last signal any launcher here received (a sweep stops launching points)


def signalled() -> int | None:
    return _signalled


class _Forward:
    """SIGTERM/SIGINT to the launcher reach every child as SIGTERM, so the training checkpoints and exits (the
    children run in their own session: Ctrl-C reaches only the launcher). A second signal kills them."""

    def __init__(self, get_processes):
        self.get_processes = get_processes
        self.received: int | None = None
        self.received_at: float | None = None
        self.count = 0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        global _signalled
        self.received = _signalled = signum
        self.received_at = self.received_at or time.time()
        self.count += 1
        for process in self.get_processes():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM if self.count == 1 else signal.SIGKILL)
        if self.count == 1:
            print(
                f"[launcher] {signal.Signals(signum).name}: asked the training to checkpoint and exit "
                "(send it "
                "again to kill)",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def run_local(job: Job, python: str = sys.executable, env: dict | None = None) -> int:
    """Runs the job in the foreground; returns its exit code."""
    os.makedirs(job.workdir, exist_ok=True)
    write_launch_record(job, "local")
    process = subprocess.Popen(job.argv(python), env={**os.environ, **(env or {})}, start_new_session=True)
    write_status(job.workdir, "running", launcher_pid=os.getpid(), pids=[process.pid])
    with _Forward(lambda: [process]) as forward:
        code = process.wait()
    _record_end(job.workdir, [code], forward.received)
    return code


def _record_end(workdir: str, codes: list[int | None], signalled: int | None, **info) -> None:
    if all(code == 0 for code in codes):
        state = "stopped" if signalled else "exited"  # collect compares the steps reached with the total
    else:
        state = "failed"
    write_status(
        workdir, state, exit_codes=codes, signal=signal.Signals(signalled).name if signalled else None, **info
    )


@dataclasses.dataclass
class ProcessReport:
    index: int
    code: int | None = None
    ended_at: float | None = None
    killed_by_launcher: bool = False
    log: str = ""

    def line(self, start: float) -> str:
        what = describe_exit(self.code)
        when = "" if self.ended_at is None else f" after {self.ended_at - start:.0f}s"
        how = " (terminated by the launcher: it did not exit by itself)" if self.killed_by_launcher else ""
        return f"process {self.index}: {what}{when}{how}; log {self.log}"


def _pump(stream, log_path: str, echo) -> None:
    """Copies a child's output to its log file (and to our stdout for process 0), bytes as they come."""
    with open(log_path, "ab") as log:
        for chunk in iter(lambda: stream.read1(65536), b""):
            log.write(chunk)
            log.flush()
            if echo is not None:
                echo.write(chunk)
                echo.flush()


def multiprocess_env(
    index: int,
    num_processes: int,
    port: int,
    devices_per_process: int,
    heartbeat_timeout: int,
    base: dict | None = None,
) -> dict:
    env = dict(os.environ if base is None else base)
    xla_flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env.update(
        {
            distributed.COORDINATOR: f"127.0.0.1:{port}",
            distributed.NUM_PROCESSES: str(num_processes),
            distributed.PROCESS_ID: str(index),
            distributed.HEARTBEAT_TIMEOUT: str(heartbeat_timeout),
            "XLA_FLAGS": " ".join(
                [*xla_flags, f"--xla_force_host_platform_device_count={devices_per_process}"]
            ),
            "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1",  # logs as they happen, and nothing lost when a process is killed
        }
    )
    return env


def run_multiprocess(
    job: Job,
    num_processes: int,
    devices_per_process: int,
    *,
    python: str = sys.executable,
    port: int = 0,
    heartbeat_timeout: int = 60,
    grace: float | None = None,
    env: dict | None = None,
    out=None,
) -> tuple[int, list[ProcessReport]]:
    """Runs `num_processes` copies of the job as one JAX job; returns (exit code, per-process reports).

    Exit code: 0 when every process exited 0, else the first failure's code (1 for a signal). A process
    that is still running `grace` seconds (default: heartbeat timeout + 30) after another one failed, or after
    the launcher forwarded a SIGTERM, is terminated and reported as such: a hang must show, not hide.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(
            f"num_processes={num_processes} and devices_per_process={devices_per_process} must be >= 1."
        )
    out = sys.stdout.buffer if out is None else out
    grace = heartbeat_timeout + 30 if grace is None else grace
    port = port or free_port()
    logs = os.path.join(job.workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    write_launch_record(
        job,
        "multiprocess",
        num_processes=num_processes,
        devices_per_process=devices_per_process,
        coordinator=f"127.0.0.1:{port}",
    )
    reports = [ProcessReport(i, log=os.path.join(logs, f"process_{i}.log")) for i in range(num_processes)]
    processes, pumps = [], []
    start = time.time()
    with _Forward(lambda: processes) as forward:
        for report in reports:
            child_env = multiprocess_env(
                report.index,
                num_processes,
                port,
                devices_per_process,
                heartbeat_timeout,
                base={**os.environ, **(env or {})},
            )
            process = subprocess.Popen(
                job.argv(python),
                env=child_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            processes.append(process)
            pump = threading.Thread(
                target=_pump,
                args=(process.stdout, report.log, out if report.index == 0 else None),
                daemon=True,
            )
            pump.start()
            pumps.append(pump)
        write_status(job.workdir, "running", launcher_pid=os.getpid(), pids=[p.pid for p in processes])
        first_failure = None
        while any(r.code is None for r in reports):
            for report, process in zip(reports, processes):
                if report.code is None and process.poll() is not None:
                    report.code, report.ended_at = process.returncode, time.time()
                    if report.code != 0 and first_failure is None:
                        first_failure = report.ended_at
                        print(
                            f"[launcher] process {report.index} {describe_exit(report.code)}; waiting up to "
                            f"{grace:.0f}s for the others to stop",
                            file=sys.stderr,
                            flush=True,
                        )
            # a process that outlives a failed peer, or a SIGTERM, by `grace` seconds is hung: end it, say so
            since = min((t for t in (first_failure, forward.received_at) if t is not None), default=None)
            if since is not None and time.time() - since > grace:
                _terminate([(r, p) for r, p in zip(reports, processes) if r.code is None])
            time.sleep(0.1)
    for pump in pumps:
        pump.join(timeout=10)
    codes = [r.code for r in reports]
    _record_end(job.workdir, codes, forward.received, processes=[r.line(start) for r in reports])
    failed = [r for r in reports if r.code != 0]
    print("[launcher] " + ("all processes exited 0" if not failed else "FAILED"), file=sys.stderr)
    for report in reports:
        print("[launcher]   " + report.line(start), file=sys.stderr)
    for report in failed:
        print(f"[launcher] process {report.index}, last words:\n" + _last_words(report.log), file=sys.stderr)
    sys.stderr.flush()
    exit_code = 0 if not failed else next((r.code for r in failed if r.code > 0), 1)
    return exit_code, reports


def _terminate(running: list[tuple[ProcessReport, subprocess.Popen]]) -> None:
    for report, process in running:
        report.killed_by_launcher = True
        process.terminate()
    deadline = time.time() + 10
    for _, process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_TELLING = re.compile(
    r"^(F\d{4} .*|\w*(Error|Exception)\b.*|error: .*|.*Terminating process.*|.*heartbeat timeout.*)$"
)


def _last_words(path: str, tail: int = 6) -> str:
    """The lines that say why a process ended (exceptions, fatal JAX logs), then its last lines."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 200_000))
            text = f.read().decode(errors="replace").replace("\r", "\n")
    except OSError:
        return "  (no log)"
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    telling = list(dict.fromkeys(line[:300] for line in lines if _TELLING.match(line)))[:4]
    kept = telling + (["..."] if telling else []) + [line[:300] for line in lines[-tail:]]
    return "\n".join("  | " + line for line in kept) if kept else "  (empty log)"
