"""The `tpu-vm` target: `gcloud compute tpus tpu-vm` commands that copy this working tree to every worker of
an existing TPU VM (or pod slice), install it, and start the same command on all workers at once.

Each worker runs the experiment with JAXPAR_DISTRIBUTED=1, so `jax.distributed.initialize()` finds the
other workers from the TPU metadata. The workdir is passed as given: on a pod slice it must be a directory
every worker sees (checkpoints are written collectively), e.g. a gcsfuse or Filestore mount.

`commands()` returns argv lists; `render()` prints them as shell lines (what --dry_run shows, pinned by the
golden files in tests/golden/tpu_vm_*); `run()` executes them in order and stops at the first failure.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess

from jaxpar.launch.job import REPO_ROOT, Job, LaunchError

EXCLUDES = (".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache")


@dataclasses.dataclass(frozen=True)
class TpuVmOptions:
    tpu: str
    zone: str
    project: str | None = None
    worker: str = "all"
    remote_dir: str = "jaxpar"  # relative to the remote home
    python: str = "python3"
    setup: str = '{python} -m pip install --quiet --upgrade -e . "jax[tpu]"'
    detach: bool = False  # start with nohup and return; logs in REMOTE_DIR/<workdir name>.log
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if not self.tpu or not self.zone:
            raise LaunchError(
                "the tpu-vm target needs --tpu=NAME and --zone=ZONE (an existing TPU VM; create one "
                "with `gcloud compute tpus tpu-vm create`)."
            )


def _gcloud(options: TpuVmOptions, verb: str, *args: str) -> list[str]:
    where = [f"--zone={options.zone}"] + ([f"--project={options.project}"] if options.project else [])
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--worker={options.worker}", *where]


def _ssh(options: TpuVmOptions, remote: str) -> list[str]:
    return _gcloud(options, "ssh", options.tpu, f"--command={remote}")


def commands(
    jobs: list[Job], options: TpuVmOptions, repo_root: str = REPO_ROOT
) -> list[tuple[str, list[str]]]:
    """[(comment, argv)]: pack, copy, unpack + install, then one run per job (in order)."""
    if not jobs:
        raise LaunchError("nothing to launch: the job list is empty.")
    archive = f"/tmp/jaxpar-{options.tpu}.tgz"
    remote_archive = f"{options.remote_dir}.tgz"
    q = shlex.quote
    workers = f"worker(s) {options.worker}" if options.worker != "all" else "every worker"
    steps = [
        (
            "pack this working tree",
            ["tar", "-czf", archive, *[f"--exclude={p}" for p in EXCLUDES], "-C", repo_root, "."],
        ),
        (f"copy it to {workers}", _gcloud(options, "scp", archive, f"{options.tpu}:{remote_archive}")),
        (
            f"unpack and install on {workers}",
            _ssh(
                options,
                " && ".join(
                    [
                        f"mkdir -p {q(options.remote_dir)}",
                        f"tar -xzf {q(remote_archive)} -C {q(options.remote_dir)}",
                        f"cd {q(options.remote_dir)}",
                        options.setup.format(python=q(options.python)),
                    ]
                ),
            ),
        ),
    ]
    env = " ".join(f"{key}={q(value)}" for key, value in (("JAXPAR_DISTRIBUTED", "1"), *options.env))
    runs = [
        f"env {env} {q(options.python)} {' '.join(q(a) for a in job.args(root=repo_root))}" for job in jobs
    ]
    if not options.detach:
        for job, run in zip(jobs, runs):
            steps.append(
                (f"run on {workers}: {job.workdir}", _ssh(options, f"cd {q(options.remote_dir)} && {run}"))
            )
        return steps
    # Detached: one background shell runs the jobs one after another (a TPU serves one process at a time).
    logged = [f"{run} > {q(_log_name(job.workdir))} 2>&1" for job, run in zip(jobs, runs)]
    background = (
        f"nohup {logged[0]} < /dev/null &"
        if len(jobs) == 1
        else f"nohup sh -c {q('; '.join(logged))} > /dev/null 2>&1 < /dev/null &"
    )
    what = jobs[0].workdir if len(jobs) == 1 else f"{len(jobs)} runs, one after another"
    steps.append(
        (
            f"start in the background on {workers} (logs in {options.remote_dir}/): {what}",
            _ssh(options, f"cd {q(options.remote_dir)} && {background}"),
        )
    )
    return steps


def _log_name(workdir: str) -> str:
    name = workdir.rstrip("/").rsplit("/", 1)[-1] or "run"
    return f"{name}.log"


def _shell_word(arg: str) -> str:
    """shlex.quote, but '--flag=value' keeps the flag outside the quotes: --command='cd jaxpar && ...'."""
    flag, sep, value = arg.partition("=")
    if arg.startswith("--") and sep and shlex.quote(flag) == flag:
        return flag + sep + shlex.quote(value)
    return shlex.quote(arg)


def shell_line(argv: list[str]) -> str:
    return " ".join(_shell_word(arg) for arg in argv)


def render(steps: list[tuple[str, list[str]]]) -> str:
    return "".join(f"# {i}. {comment}\n{shell_line(argv)}\n" for i, (comment, argv) in enumerate(steps, 1))


def run(steps: list[tuple[str, list[str]]], echo=print) -> int:
    for i, (comment, argv) in enumerate(steps, 1):
        echo(f"# {i}. {comment}\n{shell_line(argv)}")
        try:
            code = subprocess.call(argv, cwd=REPO_ROOT)
        except FileNotFoundError:
            raise LaunchError(
                f"{argv[0]} not found; install the Google Cloud CLI or use --dry_run to print the commands."
            ) from None
        if code != 0:
            echo(f"step {i} ({comment}) failed with exit code {code}; stopping.")
            return code
    return 0
