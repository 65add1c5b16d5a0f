#!/usr/bin/env python3
"""Trains a byte-level BPE tokenizer on local text and writes a Hugging Face tokenizer directory.

  python scripts/train_tokenizer.py --vocab_size=8192 --out=/tmp/tok            # the stdlib corpus
  python scripts/train_tokenizer.py --input='/data/**/*.jsonl.gz' --vocab_size=32768 --out=/tmp/tok

--out gets tokenizer.json, tokenizer_config.json and special_tokens_map.json (EOS "<|endoftext|>"):
`transformers.AutoTokenizer.from_pretrained(OUT)` loads it, and jaxpar takes OUT wherever a tokenizer is
asked for (--config.data.tokenizer=OUT, scripts/prepare_data.py --tokenizer=OUT). Inputs: .txt/.md/.py
files (one document each), .jsonl(.gz) and .parquet (--text_key); no --input: the Python standard library's
sources, jaxpar's download-free corpus.
"""

import sys
import time

from absl import app, flags, logging

from jaxpar.data import corpus, tokenizer as tokenizer_lib

_INPUT = flags.DEFINE_string(
    "input", "", "Glob of input files; empty: the Python standard library's sources."
)
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size, special token included (>= 257).")
_OUT = flags.DEFINE_string("out", None, "Directory to write the tokenizer files into.", required=True)
_TEXT_KEY = flags.DEFINE_string(
    "text_key", "text", "Field / column of the text in .jsonl and .parquet inputs."
)
_MIN_FREQUENCY = flags.DEFINE_integer("min_frequency", 2, "A pair seen fewer times is never merged.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _INPUT.value:
        try:
            paths, where = corpus.input_files(_INPUT.value), repr(_INPUT.value)
        except corpus.CorpusError as error:
            sys.exit(f"error: {error}")
    else:
        root, paths = corpus.stdlib_files()
        where = f"the standard library under {root}"
    logging.info(
        "training a byte-level BPE of %d tokens on %d file(s) of %s", _VOCAB.value, len(paths), where
    )

    def texts():
        for path in paths:
            yield from corpus.read_documents(path, _TEXT_KEY.value)

    start = time.perf_counter()
    try:
        tokenizer = tokenizer_lib.train_byte_bpe(
            texts(), _VOCAB.value, _OUT.value, min_frequency=_MIN_FREQUENCY.value
        )
    except (tokenizer_lib.TokenizerError, corpus.CorpusError) as error:
        sys.exit(f"error: {error}")
    logging.info(
        "wrote %s in %.1fs: vocab_size %d, eos_id %s, sha256 %s",
        _OUT.value,
        time.perf_counter() - start,
        tokenizer.vocab_size,
        tokenizer.eos_id,
        tokenizer.sha256,
    )


if __name__ == "__main__":
    app.run(main)
