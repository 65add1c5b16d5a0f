#!/usr/bin/env python3
"""Export a training run as a Hugging Face checkpoint directory that transformers loads:

  python scripts/export_hf.py --workdir=runs/smoke --out=/tmp/smoke_hf [--step=N] [--dtype=bfloat16]
  python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('/tmp/smoke_hf')"

Writes config.json (the family the model computes: Llama, Mistral, Qwen2, Qwen3, Mixtral or Qwen3-MoE),
safetensors shards of at most --max_shard_mb with model.safetensors.index.json, and the run's tokenizer files
if it trained with a real tokenizer.
"""

import json

from absl import app, flags

from jaxpar.infer.export import export_workdir

flags.DEFINE_string("workdir", None, "The training run to export.", required=True)
flags.DEFINE_string("out", None, "A new (or empty) directory for the Hugging Face checkpoint.", required=True)
flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest intact one).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "The dtype of the saved tensors.")
flags.DEFINE_integer("max_shard_mb", 2048, "Largest safetensors file, in MiB.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    summary = export_workdir(
        FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype, max_shard_mb=FLAGS.max_shard_mb
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
