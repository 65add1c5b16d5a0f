"""The `slurm` target: a readable sbatch script in the job's workdir, submitted with plain `sbatch`.

Why sbatch and not submitit: the script is the artifact a person reads, edits and resubmits by hand
(`sbatch WORKDIR/job.sbatch`); it runs the same command line as every other target, so nothing is
pickled and a job never depends on the submitting Python; a sweep is one native job array; and there is
no extra dependency.

Inside the job, `srun` starts one task per process and the experiment's `maybe_initialize()` calls
`jax.distributed.initialize()`, which reads SLURM_* variables. Preemption and time limits:

  time limit   `--signal=B:USR1@<grace>` warns the batch shell; it forwards SIGTERM to the training, which
               checkpoints and exits 0, then the shell runs `scontrol requeue` on its own job.
  preemption / `scontrol requeue` / scancel: Slurm sends SIGTERM itself; the shell waits for the training to
               checkpoint; with `--requeue`, Slurm puts the job back in the queue.
A requeued job reruns the same script with the same workdir and resumes from its latest checkpoint.
Each workdir's status.json says running / requeued / stopped / failed / exited, with exit code and restarts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys

from jaxpar.launch.job import REPO_ROOT, Job, LaunchError, now, override_flags, write_launch_record


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    nodes: int = 1
    tasks_per_node: int = 1  # one JAX process per task
    gpus_per_task: int = 0
    cpus_per_task: int = 1
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    signal_grace: int = 120  # seconds before the time limit at which the training is told to checkpoint
    job_name: str = "jaxpar"
    max_parallel: int | None = None  # array tasks running at once
    extra_sbatch: tuple[str, ...] = ()  # more '#SBATCH' options, e.g. '--mem=0' or '--constraint=h100'
    setup: tuple[str, ...] = ()  # shell lines run before the training (module load ..., source venv)
    env: tuple[tuple[str, str], ...] = ()  # exported in the script
    python: str = sys.executable

    def __post_init__(self):
        if self.nodes < 1 or self.tasks_per_node < 1 or self.cpus_per_task < 1 or self.gpus_per_task < 0:
            raise LaunchError(
                f"nodes={self.nodes}, tasks_per_node={self.tasks_per_node}, cpus_per_task="
                f"{self.cpus_per_task} must be >= 1 and gpus_per_task={self.gpus_per_task} >= 0."
            )
        if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", self.time):
            raise LaunchError(
                f"time={self.time!r} is not a Slurm time limit; write MINUTES, HH:MM:SS or D-HH:MM:SS."
            )


def _sbatch_lines(options: SlurmOptions, output: str, array: str | None) -> list[str]:
    lines = [
        f"--job-name={options.job_name}",
        f"--nodes={options.nodes}",
        f"--ntasks-per-node={options.tasks_per_node}",
        f"--cpus-per-task={options.cpus_per_task}",
    ]
    if options.gpus_per_task:
        lines.append(f"--gpus-per-task={options.gpus_per_task}")
    lines.append(f"--time={options.time}")
    if options.partition:
        lines.append(f"--partition={options.partition}")
    if options.account:
        lines.append(f"--account={options.account}")
    lines += [
        "--requeue",
        f"--signal=B:USR1@{options.signal_grace}",
        "--open-mode=append",
        f"--output={output}",
    ]
    if array:
        lines.append(f"--array={array}")
    lines += list(options.extra_sbatch)
    return [f"#SBATCH {line}" for line in lines]


# The part of every script that does not depend on the job: run the step, watch for signals, record status.
_BODY = r"""
mkdir -p "$WORKDIR"
restarts="${SLURM_RESTART_COUNT:-0}"
status() {  # status STATE [EXIT_CODE]: WORKDIR/status.json, read by scripts/collect.py
  printf '{"state": "%s", "exit_code": %s, "job_id": "%s", "restarts": %s, "time": "%s"}\n' \
    "$1" "${2:-null}" "${SLURM_JOB_ID}" "$restarts" "$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" \
    > "$WORKDIR/status.json.tmp" && mv "$WORKDIR/status.json.tmp" "$WORKDIR/status.json"
}

# USR1 (from --signal, before the time limit): ask the training to checkpoint, then requeue ourselves.
# TERM (preemption, scontrol requeue, scancel): Slurm signals the training too; wait for its checkpoint.
stop=""
# (scancel --signal reaches the tasks themselves; a SIGTERM to srun would make it kill the step.)
on_time_limit() {
  stop=time_limit
  echo "[jaxpar] time limit near: asking the training to checkpoint"
  scancel --signal=TERM "$SLURM_JOB_ID"
}
trap on_time_limit USR1
trap 'stop=${stop:-sigterm}; echo "[jaxpar] SIGTERM: waiting for the training to checkpoint"' TERM

echo "[jaxpar] job ${SLURM_JOB_ID} (restart ${restarts}) on ${SLURM_JOB_NODELIST}:" \
  "${SLURM_NTASKS} task(s) -> $WORKDIR"
status running
srun --kill-on-bad-exit=1 --label --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
  "$PYTHON" "$ENTRY" "--config=$CONFIG" "--workdir=$WORKDIR" "${OVERRIDES[@]}" &
step_pid=$!
while :; do  # `wait` returns early whenever a trapped signal arrives
  wait "$step_pid"; code=$?
  kill -0 "$step_pid" 2>/dev/null && continue
  wait "$step_pid" 2>/dev/null; again=$?  # the real status, if a signal interrupted the wait just as it ended
  [ "$again" != 127 ] && code=$again
  break
done

if [ "$code" = 0 ] && [ "$stop" = time_limit ]; then
  status requeued 0
  echo "[jaxpar] checkpointed before the time limit; requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
elif [ "$code" = 0 ] && [ -n "$stop" ]; then
  status stopped 0  # Slurm requeues the job itself when it was preempted or requeued
elif [ "$code" = 0 ]; then
  status exited 0
else
  status failed "$code"
fi
echo "[jaxpar] training exited with code $code"
exit "$code"
"""


def render_script(jobs: list[Job], options: SlurmOptions, output: str, comment: str = "") -> str:
    """An sbatch script for one job, or a job array over several (same entry and config, one workdir and
    override set per array index)."""
    if not jobs:
        raise LaunchError("nothing to submit: the job list is empty.")
    entries = {os.path.abspath(j.entry) for j in jobs}
    configs = {j.config for j in jobs}
    if len(entries) != 1 or len(configs) != 1:
        raise LaunchError(
            f"one script runs one entry and one config file; got {sorted(entries)} and {sorted(configs)}."
        )
    first = jobs[0]
    config_arg = first.args()[1].removeprefix("--config=")
    array = None
    if len(jobs) > 1:
        array = f"0-{len(jobs) - 1}" + (f"%{options.max_parallel}" if options.max_parallel else "")
    header = [
        "#!/bin/bash",
        f"# Written by jaxpar ({comment or 'scripts/submit.py'}) at {now()}.",
        "# Submit again with: sbatch <this file>   (a rerun resumes from each workdir's latest checkpoint)",
        *_sbatch_lines(options, output, array),
        "",
        "set -uo pipefail",
        f"cd {shlex.quote(REPO_ROOT)}",
        *options.setup,
        "export JAXPAR_DISTRIBUTED=1  # the experiment calls jax.distributed.initialize(): it reads SLURM_*",
        *(
            ["export JAXPAR_LOCAL_DEVICES=visible  # each task drives all the GPUs Slurm gives it"]
            if options.gpus_per_task or options.tasks_per_node == 1
            else []
        ),
        *[f"export {key}={shlex.quote(value)}" for key, value in options.env],
        "",
        f"PYTHON={shlex.quote(options.python)}",
        f"ENTRY={shlex.quote(os.path.abspath(first.entry))}",
        f"CONFIG={shlex.quote(config_arg)}",
    ]
    if len(jobs) == 1:
        header += [f"WORKDIR={shlex.quote(os.path.abspath(first.workdir))}", f"OVERRIDES=({_words(first)})"]
    else:
        header.append('case "$SLURM_ARRAY_TASK_ID" in')
        for index, job in enumerate(jobs):
            header.append(
                f"  {index}) WORKDIR={shlex.quote(os.path.abspath(job.workdir))}; "
                f"OVERRIDES=({_words(job)}) ;;"
            )
        header += [
            '  *) echo "no sweep point for array index $SLURM_ARRAY_TASK_ID"; exit 2 ;;',
            "esac",
            "# this task's Slurm log, linked into its workdir",
            f'mkdir -p "$WORKDIR" && ln -sfn {shlex.quote(os.path.dirname(output))}'
            '/"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}.out" "$WORKDIR/slurm.out"',
        ]
    return "\n".join(header) + "\n" + _BODY


def _words(job: Job) -> str:
    return " ".join(shlex.quote(flag) for flag in override_flags(job.overrides))


def sbatch(script_path: str, env: dict | None = None) -> str:
    """Submits; returns the job id."""
    try:
        result = subprocess.run(
            ["sbatch", "--parsable", script_path],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=120,
        )
    except FileNotFoundError:
        raise LaunchError(
            "sbatch not found: run this on a Slurm login node (or where Slurm's client "
            f"commands are on PATH). The script is ready: {script_path}"
        ) from None
    if result.returncode != 0:
        raise LaunchError(f"sbatch {script_path} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def submit(
    jobs: list[Job], options: SlurmOptions, script_dir: str, *, dry_run: bool = False, comment: str = ""
) -> tuple[str, str | None]:
    """Writes `script_dir/job.sbatch` (a single job) or `script_dir/sweep.sbatch` (an array) and submits it
    unless dry_run; returns (script path, job id or None). Every job's workdir gets launch.json."""
    os.makedirs(script_dir, exist_ok=True)
    if len(jobs) == 1:
        path, output = (
            os.path.join(script_dir, "job.sbatch"),
            os.path.join(os.path.abspath(script_dir), "slurm-%j.out"),
        )
    else:
        logs = os.path.join(os.path.abspath(script_dir), "slurm")
        os.makedirs(logs, exist_ok=True)
        path, output = os.path.join(script_dir, "sweep.sbatch"), os.path.join(logs, "%A_%a.out")
    with open(path, "w") as f:
        f.write(render_script(jobs, options, output, comment))
    os.chmod(path, 0o755)
    job_id = None if dry_run else sbatch(path)
    for index, job in enumerate(jobs):
        os.makedirs(job.workdir, exist_ok=True)
        slurm = {"script": os.path.abspath(path), "job_id": job_id}
        if len(jobs) > 1:
            slurm.update(array_index=index, array_task=None if job_id is None else f"{job_id}_{index}")
        write_launch_record(job, "slurm", slurm=slurm, options=dataclasses.asdict(options))
    return path, job_id


def job_states(job_id: str, env: dict | None = None) -> dict[str, tuple[str, str]]:
    """{job id (array tasks as '<array>_<index>'): (state, exit code 'N:S')} from `scontrol show job`;
    completed jobs stay visible for the cluster's MinJobAge."""
    result = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )
    states = {}
    for line in result.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        key = fields.get("JobId", "")
        if fields.get("ArrayJobId") and fields.get("ArrayTaskId", "").isdigit():
            key = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
        states[key] = (fields.get("JobState", "?"), fields.get("ExitCode", "?"))
    return states
