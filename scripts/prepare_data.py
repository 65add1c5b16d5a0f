#!/usr/bin/env python3
"""Tokenizes local text into token shards plus a manifest, for data.source=tokens.

  python scripts/prepare_data.py --input='/data/**/*.jsonl.gz' --tokenizer=/tmp/tok --out=/data/prepared
  python experiments/train_lm.py --config=configs/lm.py:smoke --workdir=/tmp/lm \\
      --config.data.source=tokens --config.data.path=/data/prepared --config.model.vocab_size=8192

Inputs: .txt/.md/.py (one document per file), .jsonl and .jsonl.gz (one per line, text under --text_key),
.parquet (one per row, column --text_key). Each document's ids are followed by the tokenizer's EOS. --out
(new or empty) gets shard_00000.bin, ... (flat uint16, or uint32 for vocabularies over 65536) and
manifest.json, written last: token and document counts, dtype, vocab size, the tokenizer's spec and
sha256, the source files and the shards. The work is in jaxpar/data/corpus.py.
"""

import os
import sys

from absl import app, flags, logging

from jaxpar.data import corpus, tokenizer as tokenizer_lib

_INPUT = flags.DEFINE_string(
    "input", None, "Glob of input files (** reaches into subdirectories).", required=True
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "'bytes', a tokenizer.json, or a directory holding one (HF model dir).", required=True
)
_OUT = flags.DEFINE_string("out", None, "Output directory (new or empty).", required=True)
_TEXT_KEY = flags.DEFINE_string(
    "text_key", "text", "Field / column of the text in .jsonl and .parquet inputs."
)
_WORKERS = flags.DEFINE_integer(
    "workers", os.cpu_count() or 1, "Tokenizing worker processes; 0 tokenizes in this process."
)
_SHARD_TOKENS = flags.DEFINE_integer(
    "shard_tokens", corpus.DEFAULT_SHARD_TOKENS, "A new shard starts once one holds this many tokens."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
        manifest = corpus.prepare(
            _INPUT.value,
            _TOKENIZER.value,
            _OUT.value,
            text_key=_TEXT_KEY.value,
            workers=_WORKERS.value,
            shard_tokens=_SHARD_TOKENS.value,
            progress=True,
        )
    except (tokenizer_lib.TokenizerError, corpus.CorpusError) as error:
        sys.exit(f"error: {error}")
    logging.info(
        "wrote %s: %d tokens (%s) from %d documents in %d file(s), %d shard(s), %.1fs with %d worker(s)",
        os.path.join(_OUT.value, corpus.MANIFEST),
        manifest["tokens"],
        manifest["dtype"],
        manifest["documents"],
        len(manifest["sources"]),
        len(manifest["shards"]),
        manifest["seconds"],
        manifest["workers"],
    )


if __name__ == "__main__":
    app.run(main)
