"""Flags and main functions behind scripts/submit.py and scripts/sweep.py (the scripts stay thin).

Both take the experiment's own syntax, `--config=configs/lm.py:smoke --config.KEY=VALUE`: the config is
loaded here with the overrides applied, so a typo fails before anything is submitted, and the same
overrides are passed on to the experiment.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

from absl import flags
from ml_collections import config_flags

from jaxpar.config import ConfigError, check_overrides
from jaxpar.launch import local, slurm, tpu_vm
from jaxpar.launch.job import Job, LaunchError, apply_overrides, default_entry, now, split_config_arg
from jaxpar.launch.sweep import load_sweep, point_names, write_manifest

TARGETS = ("local", "multiprocess", "slurm", "tpu-vm")
FLAGS = flags.FLAGS


def define_flags(sweep: bool) -> None:
    config_flags.DEFINE_config_file("config", None, "Config file and preset, e.g. configs/lm.py:smoke.")
    flags.DEFINE_string(
        "workdir",
        None,
        "Sweep directory (one workdir per point inside)."
        if sweep
        else "Run directory: checkpoints, metrics, config, launch.json, status.json.",
    )
    if sweep:
        flags.DEFINE_string("sweep", None, "Name passed to get_sweep() of the config file.")
    flags.DEFINE_enum("target", "local", TARGETS, "Where to run.")
    flags.DEFINE_string("entry", None, "Experiment script; default experiments/train_<config family>.py.")
    flags.DEFINE_string(
        "python", sys.executable, "Python that runs the experiment (local, multiprocess, slurm)."
    )
    flags.DEFINE_multi_string("env", [], "KEY=VALUE set in the experiment's environment (repeatable).")
    flags.DEFINE_bool(
        "dry_run",
        False,
        "Print (tpu-vm, local, multiprocess) or write without submitting (slurm) instead of running.",
    )
    # multiprocess
    flags.DEFINE_integer("num_processes", 2, "multiprocess: processes on this machine.")
    flags.DEFINE_integer("devices_per_process", 4, "multiprocess: CPU devices per process.")
    flags.DEFINE_integer("port", 0, "multiprocess: coordinator port on 127.0.0.1 (0: a free one).")
    flags.DEFINE_integer(
        "heartbeat_timeout", 60, "multiprocess: seconds before survivors of a dead process abort."
    )
    # slurm
    flags.DEFINE_integer("nodes", 1, "slurm: nodes.")
    flags.DEFINE_integer("tasks_per_node", 1, "slurm: tasks (JAX processes) per node.")
    flags.DEFINE_integer("gpus_per_task", 0, "slurm: GPUs per task (0: no --gpus-per-task line).")
    flags.DEFINE_integer("cpus_per_task", 1, "slurm: CPUs per task.")
    flags.DEFINE_string("time", "01:00:00", "slurm: time limit (MINUTES, HH:MM:SS or D-HH:MM:SS).")
    flags.DEFINE_string("partition", None, "slurm: partition.")
    flags.DEFINE_string("account", None, "slurm: account.")
    flags.DEFINE_integer(
        "signal_grace",
        120,
        "slurm: seconds before the time limit when the training is told "
        "to checkpoint (then the job requeues itself).",
    )
    flags.DEFINE_string("job_name", None, "slurm: job name (default <config family>-<preset>).")
    flags.DEFINE_integer("max_parallel", None, "slurm sweeps: array tasks running at once.")
    flags.DEFINE_multi_string(
        "sbatch", [], "slurm: extra #SBATCH option, e.g. --sbatch=--mem=0 (repeatable)."
    )
    flags.DEFINE_multi_string(
        "setup", [], "slurm: shell line run before the training, e.g. 'module load cuda' (repeatable)."
    )
    # tpu-vm
    flags.DEFINE_string("tpu", None, "tpu-vm: name of an existing TPU VM.")
    flags.DEFINE_string("zone", None, "tpu-vm: its zone.")
    flags.DEFINE_string("project", None, "tpu-vm: its project (default: gcloud's).")
    flags.DEFINE_string("tpu_worker", "all", "tpu-vm: workers to run on.")
    flags.DEFINE_string("remote_dir", "jaxpar", "tpu-vm: code directory on the workers (relative to home).")
    flags.DEFINE_string("tpu_python", "python3", "tpu-vm: Python on the workers.")
    flags.DEFINE_string(
        "tpu_setup",
        tpu_vm.TpuVmOptions.setup,
        "tpu-vm: install command run in the code directory ({python} is replaced).",
    )
    flags.DEFINE_bool("detach", False, "tpu-vm: start with nohup and return (log in the remote code dir).")
    flags.mark_flags_as_required(["config", "workdir", *(["sweep"] if sweep else [])])


def _env_pairs() -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in FLAGS.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--env={item!r}: write KEY=VALUE.")
        pairs.append((key, value))
    return tuple(pairs)


def _total_steps(config) -> int | None:
    try:
        return int(config.train.steps)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _base() -> tuple[str, str, dict, object]:
    """(entry, absolute config arg, CLI overrides, config with them applied)."""
    config_arg = config_flags.get_config_filename(FLAGS["config"])
    path, preset = split_config_arg(config_arg)
    if not os.path.exists(path):
        raise LaunchError(f"--config={config_arg}: {path} does not exist.")
    config_arg = os.path.abspath(path) + (f":{preset}" if preset is not None else "")
    entry = os.path.abspath(FLAGS.entry) if FLAGS.entry else default_entry(path)
    if not os.path.exists(entry):
        raise LaunchError(f"--entry={FLAGS.entry}: no such file.")
    return entry, config_arg, dict(config_flags.get_override_values(FLAGS["config"])), FLAGS.config


def _workdir(path: str) -> str:
    # TPU VM workdirs are paths on the workers: passed as typed. Elsewhere: absolute, so every process agrees.
    return path if FLAGS.target == "tpu-vm" else os.path.abspath(path)


def _slurm_options(config_arg: str) -> slurm.SlurmOptions:
    path, preset = split_config_arg(config_arg)
    family = os.path.splitext(os.path.basename(path))[0]
    return slurm.SlurmOptions(
        nodes=FLAGS.nodes,
        tasks_per_node=FLAGS.tasks_per_node,
        gpus_per_task=FLAGS.gpus_per_task,
        cpus_per_task=FLAGS.cpus_per_task,
        time=FLAGS.time,
        partition=FLAGS.partition,
        account=FLAGS.account,
        signal_grace=FLAGS.signal_grace,
        job_name=FLAGS.job_name or "-".join(filter(None, (family, preset))),
        max_parallel=FLAGS.max_parallel,
        extra_sbatch=tuple(FLAGS.sbatch),
        setup=tuple(FLAGS.setup),
        env=_env_pairs(),
        python=FLAGS.python,
    )


def _tpu_options() -> tpu_vm.TpuVmOptions:
    return tpu_vm.TpuVmOptions(
        tpu=FLAGS.tpu,
        zone=FLAGS.zone,
        project=FLAGS.project,
        worker=FLAGS.tpu_worker,
        remote_dir=FLAGS.remote_dir,
        python=FLAGS.tpu_python,
        setup=FLAGS.tpu_setup,
        detach=FLAGS.detach,
        env=_env_pairs(),
    )


def launch(jobs: list[Job], script_dir: str, comment: str) -> tuple[int, dict]:
    """Runs or submits `jobs` on FLAGS.target; returns (exit code, facts for the manifest)."""
    target = FLAGS.target
    if target == "tpu-vm":
        steps = tpu_vm.commands(jobs, _tpu_options())
        if FLAGS.dry_run:
            sys.stdout.write(tpu_vm.render(steps))
            return 0, {}
        return tpu_vm.run(steps), {}
    if target == "slurm":
        script, job_id = slurm.submit(
            jobs, _slurm_options(jobs[0].config), script_dir, dry_run=FLAGS.dry_run, comment=comment
        )
        print(f"sbatch script: {script}")
        if job_id is None:
            print(f"not submitted (--dry_run); submit with: sbatch {script}")
        else:
            print(
                f"submitted job {job_id}"
                + (f" (array of {len(jobs)})" if len(jobs) > 1 else "")
                + f"; watch with: squeue -j {job_id}"
            )
        return 0, {"slurm": {"script": os.path.abspath(script), "job_id": job_id}}
    env = dict(_env_pairs())
    failures = last_code = 0
    for index, job in enumerate(jobs):
        if len(jobs) > 1:
            print(f"[{index + 1}/{len(jobs)}] {job.workdir}", flush=True)
        if FLAGS.dry_run:
            print(shlex.join(job.argv(FLAGS.python)))
            continue
        if target == "local":
            code = local.run_local(job, python=FLAGS.python, env=env)
        else:
            code, _ = local.run_multiprocess(
                job,
                FLAGS.num_processes,
                FLAGS.devices_per_process,
                python=FLAGS.python,
                port=FLAGS.port,
                heartbeat_timeout=FLAGS.heartbeat_timeout,
                env=env,
            )
        failures += code != 0
        last_code = code
        if local.signalled():
            if index + 1 < len(jobs):
                print(
                    f"stopping the sweep ({signal.Signals(local.signalled()).name}); rerun the same "
                    "command to "
                    "resume: finished points redo no steps, stopped ones resume from their checkpoint",
                    file=sys.stderr,
                )
            break
    if failures and len(jobs) > 1:
        print(f"{failures} of {len(jobs)} runs failed; see scripts/collect.py {script_dir}", file=sys.stderr)
    return (0 if not failures else (last_code if len(jobs) == 1 else 1)), {}


def submit_main(argv) -> int:
    if len(argv) > 1:
        raise LaunchError(f"unexpected arguments {argv[1:]}; overrides are written --config.KEY=VALUE.")
    entry, config_arg, overrides, config = _base()
    job = Job(
        entry=entry,
        config=config_arg,
        workdir=_workdir(FLAGS.workdir),
        overrides=overrides,
        total_steps=_total_steps(config),
    )
    code, _ = launch([job], job.workdir, "scripts/submit.py")
    return code


def sweep_main(argv) -> int:
    if len(argv) > 1:
        raise LaunchError(f"unexpected arguments {argv[1:]}; overrides are written --config.KEY=VALUE.")
    entry, config_arg, common, config = _base()
    points = load_sweep(split_config_arg(config_arg)[0], FLAGS.sweep)
    sweep_dir = _workdir(FLAGS.workdir)
    jobs = []
    for name, point in zip(point_names(points), points):
        clash = sorted(set(point) & set(common))
        if clash:
            raise LaunchError(
                f"sweep {FLAGS.sweep!r} sets {clash}, also given on the command line; drop one."
            )
        point_config = apply_overrides(config, point)
        jobs.append(
            Job(
                entry=entry,
                config=config_arg,
                workdir=os.path.join(sweep_dir, name),
                overrides={**common, **point},
                total_steps=_total_steps(point_config),
            )
        )
    record = {
        "config": config_arg,
        "sweep": FLAGS.sweep,
        "target": FLAGS.target,
        "entry": entry,
        "created": now(),
        "common_overrides": common,
        "points": [
            {
                "name": os.path.basename(j.workdir),
                "workdir": j.workdir,
                "overrides": {k: v for k, v in j.overrides.items() if k not in common},
            }
            for j in jobs
        ],
    }
    if FLAGS.target != "tpu-vm":  # a TPU sweep directory lives on the workers
        os.makedirs(sweep_dir, exist_ok=True)
        write_manifest(sweep_dir, record)
    print(f"sweep {FLAGS.sweep!r}: {len(jobs)} points -> {sweep_dir}", flush=True)
    code, facts = launch(jobs, sweep_dir, f"scripts/sweep.py --sweep={FLAGS.sweep}")
    if facts and FLAGS.target != "tpu-vm":
        write_manifest(sweep_dir, {**record, **facts})
    return code


def check_config_flags(argv=None, default: str | None = None) -> None:
    """For every entry point taking `--config`, before `app.run`: a misspelled `--config.KEY` (or an unknown
    preset) exits with one line, as other config errors do, instead of the flag parser's traceback."""
    try:
        check_overrides(sys.argv if argv is None else argv, default=default)
    except ConfigError as error:
        sys.exit(f"error: {error}")


def run(main):
    """absl main wrapper for scripts/submit.py and sweep.py, called before `app.run` parses the flags:
    checks the --config overrides first (check_config_flags); a launcher error prints one line and
    exits 1."""
    check_config_flags()

    def wrapped(argv):
        try:
            sys.exit(main(argv))
        except LaunchError as error:
            sys.exit(f"error: {error}")

    return wrapped
