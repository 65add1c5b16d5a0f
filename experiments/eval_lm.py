#!/usr/bin/env python3
"""Evaluate a jaxpar run or a Hugging Face checkpoint with lm-evaluation-harness, on the mesh:

  python experiments/eval_lm.py --workdir=runs/a --tasks=my_task --include_path=my_tasks [--mesh=tensor=2]
  python experiments/eval_lm.py --hf_path=DIR --tasks=hellaswag --limit=100

Results (lm-eval's JSON, per-sample records with --log_samples) go to --output_dir (default: <workdir>/eval/,
or ./eval/<directory name>/ for --hf_path) and the metrics table is printed. Tasks from lm-eval's registry
download their datasets on first use; a local YAML task (see README, "Evaluating with lm-eval") needs no
network.
"""

import json
import os
import sys
import time

from absl import app, flags, logging

from jaxpar.infer import cli, harness, model as model_lib

flags.DEFINE_string("workdir", None, "A training run's directory.")
flags.DEFINE_string("hf_path", None, "Or a Hugging Face checkpoint directory.")
flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the newest intact one).")
flags.DEFINE_list("tasks", None, "lm-eval task names (comma separated).", required=True)
flags.DEFINE_string("include_path", None, "A folder of your own lm-eval task YAML files.")
flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt (default: the task's).")
flags.DEFINE_float("limit", None, "Evaluate only this many documents per task (a fraction if < 1).")
flags.DEFINE_integer("batch_size", 8, "Rows per scoring forward (rounded up to fill the batch axes).")
flags.DEFINE_string("mesh", "", "Inference mesh, e.g. 'data=2,tensor=2' (default: one device).")
flags.DEFINE_string("output_dir", None, "Where results go (default: <workdir>/eval/ or ./eval/<name>/).")
flags.DEFINE_bool("log_samples", False, "Also write every document's requests and scores.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        model = model_lib.load(
            FLAGS.workdir, FLAGS.hf_path, model_lib.inference_mesh(cli.parse_mesh(FLAGS.mesh)), FLAGS.step
        )
    except cli.USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    limit = None if FLAGS.limit is None else (int(FLAGS.limit) if FLAGS.limit >= 1 else FLAGS.limit)
    results = harness.evaluate(
        model,
        FLAGS.tasks,
        include_path=FLAGS.include_path,
        num_fewshot=FLAGS.num_fewshot,
        limit=limit,
        batch_size=FLAGS.batch_size,
        log_samples=FLAGS.log_samples,
    )
    from lm_eval.utils import make_table

    print(make_table(results))
    name = os.path.basename(os.path.normpath(FLAGS.hf_path or FLAGS.workdir))
    out = FLAGS.output_dir or (
        os.path.join(FLAGS.workdir, "eval") if FLAGS.workdir else os.path.join("eval", name)
    )
    os.makedirs(out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    samples = results.pop("samples", None)
    path = os.path.join(out, f"results_{stamp}.json")
    with open(path, "w") as f:
        json.dump({"model": model.name, **results}, f, indent=2, default=str)
    if samples:
        for task, records in samples.items():
            with open(os.path.join(out, f"samples_{task}_{stamp}.jsonl"), "w") as f:
                for record in records:
                    f.write(json.dumps(record, default=str) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
