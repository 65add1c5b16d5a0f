#!/usr/bin/env python3
"""Serve a trained run over an OpenAI-compatible HTTP API (/v1/models, /v1/completions,
/v1/chat/completions), streaming or not, many clients sharing the engine's slots.

  python scripts/serve.py --workdir=/tmp/lm --port=8000 [--slots=8 --mesh=data=1,tensor=2]
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "lm@200", "prompt": "def main(", "max_tokens": 32}'

The model's name is <workdir name>@<step> (GET /v1/models lists it).
"""

import sys

from absl import app, flags

from jaxpar.infer import cli

cli.define_serve_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    sys.exit(cli.serve_main(flags.FLAGS))


if __name__ == "__main__":
    app.run(main)
