"""Generate text from a trained run.

  python experiments/generate.py --workdir=/tmp/lm --prompt="def main(" --max_new_tokens=64
  python experiments/generate.py --workdir=/tmp/lm --prompts_file=prompts.jsonl --output=out.jsonl
  python experiments/generate.py --workdir=/tmp/lm --prompt_ids=10,32,101 --temperature=0

One prompt streams its completion to the terminal as it is generated; many prompts share the engine's
slots (continuous batching) and each completion is printed when done. --output writes one JSON line per
prompt: prompt, completion, token_ids (the generated ids only), finish_reason (and logprobs with
--logprobs). --prompts_file lines are {"prompt": "..."} or {"prompt_ids": [...]} (optionally with their
own "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed").
"""

import sys

from absl import app, flags

from jaxpar.infer import cli

cli.define_generate_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    sys.exit(cli.generate_main(flags.FLAGS))


if __name__ == "__main__":
    app.run(main)
