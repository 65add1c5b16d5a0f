"""A private single-node Slurm cluster under one directory, for tests and for trying the `slurm` target on
a workstation: its own munge key and socket, its own ports and state, the node sized to this machine.

    cluster = LocalSlurmCluster("/tmp/slurm"); cluster.start()
    subprocess.run(["sbatch", ...], env=cluster.env)   # SLURM_CONF points the client commands at it
    cluster.stop()                                     # every daemon stopped by its PID

Needs Debian's `slurm-wlm` and `munge` (Slurm 22.05) and root (slurmd launches jobs). Nothing is installed
here; `missing_binaries()` says what is absent. No cgroups: `proctrack/linuxproc`, `task/none`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from jaxpar.launch.local import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


def missing_binaries() -> list[str]:
    return [name for name in (*DAEMONS, "sbatch", "scontrol", "squeue") if find_binary(name) is None]


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return int(total_kb / 1024 * 0.9)  # slurmd refuses a node that reports less memory than configured


class LocalSlurmCluster:
    def __init__(self, root: str, cpus: int | None = None, kill_wait: int = 30):
        self.root = os.path.abspath(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.kill_wait = kill_wait
        self.node = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket")
        self.pids: dict[str, int] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (and, through sbatch's default --export=ALL, for jobs)."""
        return {**os.environ, "SLURM_CONF": self.conf}

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def write_config(self) -> None:
        ctld_port, d_port = free_port(), free_port()
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(self._path(sub), mode=0o700, exist_ok=True)
        config = f"""# private single-node cluster written by jaxpar.launch.slurm_cluster
ClusterName=jaxpar
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self._path("state")}
SlurmdSpoolDir={self._path("spool")}
SlurmctldPidFile={self._path("slurmctld.pid")}
SlurmdPidFile={self._path("slurmd.pid")}
SlurmctldLogFile={self._path("log", "slurmctld.log")}
SlurmdLogFile={self._path("log", "slurmd.log")}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobCompType=jobcomp/filetxt
JobCompLoc={self._path("log", "jobcomp.txt")}
MpiDefault=none
ReturnToService=2
KillWait={self.kill_wait}
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(config)

    def start(self, timeout: float = 60) -> None:
        missing = missing_binaries()
        if missing:
            raise RuntimeError(
                f"Slurm/munge binaries missing: {missing}; install Debian's slurm-wlm and munge."
            )
        self.write_config()
        key = self._path("munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._daemon(
            "munged",
            [
                find_binary("munged"),
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self._path('munge', 'munged.pid')}",
                f"--log-file={self._path('log', 'munged.log')}",
                f"--seed-file={self._path('munge', 'munged.seed')}",
            ],
            self._path("munge", "munged.pid"),
            timeout,
        )
        self._daemon(
            "slurmctld",
            [find_binary("slurmctld"), "-f", self.conf, "-c", "-i"],
            self._path("slurmctld.pid"),
            timeout,
        )
        self._daemon(
            "slurmd",
            [find_binary("slurmd"), "-f", self.conf, "-N", self.node],
            self._path("slurmd.pid"),
            timeout,
        )
        self.wait_for_node(timeout)

    def _daemon(self, name: str, argv: list[str], pid_file: str, timeout: float) -> None:
        """Starts a daemon that forks into the background and records its PID in `pid_file`."""
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"{name} failed to start ({result.returncode}): {result.stderr.strip()}\n"
                f"{self.log_tail(name)}"
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with open(pid_file) as f:
                    self.pids[name] = int(f.read().strip())
                return
            except (OSError, ValueError):
                time.sleep(0.1)
        raise RuntimeError(f"{name} wrote no PID file {pid_file}\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            with open(self._path("log", f"{name}.log")) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def scontrol(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def wait_for_node(self, timeout: float) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            out = self.scontrol("show", "node", self.node, check=False)
            state = next((w.split("=", 1)[1] for w in out.split() if w.startswith("State=")), "")
            if state.startswith("IDLE"):
                return
            time.sleep(0.3)
        raise RuntimeError(
            f"node {self.node} not idle after {timeout}s (state {state!r})\n"
            f"{self.log_tail('slurmctld')}\n{self.log_tail('slurmd')}"
        )

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancels this cluster's jobs and waits for them to end: a job's processes belong to slurmstepd,
        which outlives slurmd."""
        if "slurmctld" not in self.pids:
            return
        subprocess.run(
            ["scancel", "--full", "--user", str(os.getuid())], env=self.env, capture_output=True, timeout=60
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            result = subprocess.run(
                ["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True, timeout=60
            )
            if result.returncode != 0 or not result.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self, timeout: float = 30) -> None:
        """Cancels every job, then SIGTERM to each daemon by PID (slurmd, slurmctld, munged), then SIGKILL to
        any still alive."""
        try:
            self.cancel_all()
        except (OSError, subprocess.TimeoutExpired):
            pass
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + timeout
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as stopped.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
