"""The slurm target against a real Slurm: a private single-node cluster (its own munge key and socket, ports,
state directory; proctrack/linuxproc, task/none; the node sized to this machine) started from the binaries of
Debian's slurm-wlm and munge, which .ci/run installs. Nothing is installed here: without the binaries the
test is skipped, with the reason (JAXPAR_REQUIRE_SLURM=1, set by .ci/run, turns that skip into a failure).

One test, in phases, because the cluster is shared: pytest-xdist would start one cluster per worker.
  1. submit through scripts/sweep.py (a 2-point job array), scripts/submit.py (a 2-task jax.distributed job)
     and scripts/submit.py (a longer 1-task job to preempt)
  2. preempt: `scontrol requeue` -> SIGTERM -> checkpoint -> exit -> requeued -> StartTime=now -> resumes
  3. wait for all; check Slurm's exit states, each workdir's metrics and status.json, scripts/collect.py
Every daemon is stopped by its PID at the end.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from jaxpar.launch import slurm
from jaxpar.launch.collect import summarize
from jaxpar.launch.slurm_cluster import LocalSlurmCluster, missing_binaries
from jaxpar.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.checkpoint_every=0"]
CPU8 = ["--env=XLA_FLAGS=--xla_force_host_platform_device_count=8", "--env=JAX_PLATFORMS=cpu"]
CPU4 = [
    "--env=XLA_FLAGS=--xla_force_host_platform_device_count=4",
    "--env=JAX_PLATFORMS=cpu",
    "--env=JAXPAR_HEARTBEAT_TIMEOUT=30",
]


def test_sbatch_script_is_valid_bash_with_the_requested_resources(tmp_path):
    """Rendering needs no cluster: GPU jobs bind GPUs per task and drive all of them per process."""
    from jaxpar.launch.distributed import _visible_gpu_ids
    from jaxpar.launch.job import Job

    jobs = [
        Job(
            os.path.join(ROOT, "experiments", "train_lm.py"),
            os.path.join(ROOT, "configs", "lm.py:llama_1b"),
            str(tmp_path / f"lr={lr}"),
            {"optimizer.learning_rate": lr},
        )
        for lr in (1e-4, 3e-4)
    ]
    options = slurm.SlurmOptions(
        nodes=4,
        tasks_per_node=8,
        gpus_per_task=1,
        cpus_per_task=12,
        time="2-00:00:00",
        partition="h100",
        account="lab",
        signal_grace=300,
        max_parallel=1,
        extra_sbatch=("--mem=0",),
        setup=("module load cuda/12.4",),
    )
    script = slurm.render_script(jobs, options, str(tmp_path / "slurm" / "%A_%a.out"))
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --partition=h100",
        "#SBATCH --account=lab",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --array=0-1%1",
        "#SBATCH --mem=0",
        "module load cuda/12.4",
        "export JAXPAR_LOCAL_DEVICES=visible",
        "OVERRIDES=(--config.optimizer.learning_rate=0.0003)",
    ):
        assert line in script, line
    (tmp_path / "job.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)
    with pytest.raises(Exception, match="time"):
        slurm.SlurmOptions(time="tomorrow")
    assert _visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "4,5"}) == [0, 1]
    assert _visible_gpu_ids({}) is None


def _skip_reason():
    missing = missing_binaries()
    if missing:
        return (
            f"Slurm/munge binaries not installed ({', '.join(missing)}); .ci/run installs slurm-wlm and munge"
        )
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        if os.environ.get("JAXPAR_REQUIRE_SLURM") == "1":
            pytest.fail(f"JAXPAR_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    # a short root: munge's socket path must fit in sun_path (108 bytes)
    root = tmp_path_factory.mktemp("slurm")
    cluster = LocalSlurmCluster(str(root))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.pids


def launch(cluster, script, workdir, *args):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", script),
            "--target=slurm",
            "--config=configs/lm.py:smoke",
            f"--workdir={workdir}",
            "--time=10",
            *args,
        ],
        env=cluster.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return next(
        line.split()[2].rstrip(";") for line in result.stdout.splitlines() if line.startswith("submitted job")
    )


def wait_until(predicate, timeout, what, cluster):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    queue = subprocess.run(["squeue"], env=cluster.env, capture_output=True, text=True).stdout
    raise TimeoutError(f"{what} after {timeout}s\n{queue}\n{cluster.log_tail('slurmctld')}")


def logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return [r["step"] for r in read_metrics(path) if "loss" in r] if os.path.exists(path) else []


def test_slurm_sweep_distributed_job_and_requeue(cluster, tmp_path):
    # 1. submit. The job to preempt goes first so that it starts at once (the node has this machine's CPUs).
    preempt_dir = tmp_path / "preempt"
    preempt = launch(cluster, "submit.py", preempt_dir, *CPU8, "--config.train.steps=100", *QUICK)
    sweep_dir = tmp_path / "sweep"
    array = launch(cluster, "sweep.py", sweep_dir, "--sweep=tiny", *CPU8, "--config.train.steps=4", *QUICK)
    dist_dir = tmp_path / "dist"
    dist = launch(
        cluster, "submit.py", dist_dir, "--tasks_per_node=2", *CPU4, "--config.train.steps=4", *QUICK
    )

    script = (dist_dir / "job.sbatch").read_text()
    for line in (
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --time=10",
        "export JAXPAR_DISTRIBUTED=1",
        "srun --kill-on-bad-exit=1",
    ):
        assert line in script, line
    assert "#SBATCH --array=0-1" in (sweep_dir / "sweep.sbatch").read_text()

    # 2. preempt once training runs: SIGTERM -> checkpoint -> exit 0; Slurm requeues with a BeginTime ~2 min
    #    away, which we bring forward
    wait_until(
        lambda: len(logged_steps(preempt_dir)) >= 3, 300, "job to preempt never reached step 3", cluster
    )
    cluster.scontrol("requeue", preempt)
    wait_until(
        lambda: slurm.job_states(preempt, cluster.env)[preempt][0] == "PENDING",
        120,
        "requeued job never became PENDING",
        cluster,
    )
    status = json.loads((preempt_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["exit_code"] == 0, status
    cluster.scontrol("update", f"JobId={preempt}", "StartTime=now")

    # 3. everything finishes
    def all_done():
        states = {
            **slurm.job_states(preempt, cluster.env),
            **slurm.job_states(array, cluster.env),
            **slurm.job_states(dist, cluster.env),
        }
        return len(states) == 4 and all(
            s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s, _ in states.values()
        )

    wait_until(all_done, 420, "jobs did not finish", cluster)
    states = {
        **slurm.job_states(preempt, cluster.env),
        **slurm.job_states(array, cluster.env),
        **slurm.job_states(dist, cluster.env),
    }
    assert states == {
        preempt: ("COMPLETED", "0:0"),
        f"{array}_0": ("COMPLETED", "0:0"),
        f"{array}_1": ("COMPLETED", "0:0"),
        dist: ("COMPLETED", "0:0"),
    }, states

    # the preempted job: checkpointed at step N, resumed from N, every step logged once
    log = (preempt_dir / f"slurm-{preempt}.out").read_text(errors="replace")
    saved = int(log.split("SIGTERM: saved checkpoint at step ")[1].split(";")[0])
    assert 3 <= saved < 100
    assert "(restart 1)" in log
    assert logged_steps(preempt_dir) == list(range(1, 101))
    status = json.loads((preempt_dir / "status.json").read_text())
    assert status["state"] == "exited" and status["restarts"] == 1, status
    assert summarize(str(preempt_dir)).status == "completed"

    # the 2-task job: two JAX processes, one metrics file written by process 0
    log = (dist_dir / f"slurm-{dist}.out").read_text(errors="replace")
    assert "jax.distributed: process 0/2, 4 local of 8 devices" in log
    assert "jax.distributed: process 1/2, 4 local of 8 devices" in log
    assert logged_steps(dist_dir) == [1, 2, 3, 4]

    # the sweep: one workdir per point, named after its overrides, each with its own log and metrics
    for name, lr in (("learning_rate=0.001", 0.001), ("learning_rate=0.003", 0.003)):
        point = sweep_dir / name
        assert logged_steps(point) == [1, 2, 3, 4], name
        assert json.loads((point / "config.json").read_text())["optimizer"]["learning_rate"] == lr
        assert "training exited with code 0" in (point / "slurm.out").read_text(errors="replace")
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert manifest["slurm"]["job_id"] == array and len(manifest["points"]) == 2
    collected = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "collect.py"), str(sweep_dir)],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert collected.returncode == 0 and "2 runs: 2 completed" in collected.stdout, collected.stdout
