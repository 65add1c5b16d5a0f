"""One tokenizer interface for training, data preparation and inference.

`load_tokenizer(spec)`: "" or "bytes" is the byte tokenizer of jaxpar's byte-level corpora (token id =
UTF-8 byte); anything else is a path to a Hugging Face `tokenizer.json`, or to a directory holding one (a
model directory; its `tokenizer_config.json` names the special tokens and the chat template).

Every tokenizer has `vocab_size` (largest id + 1), `eos_id` (appended after each document of a prepared
corpus), `bos_id` (or None), `encode`, `encode_batch`, `decode`, and `sha256`: a fingerprint of the ids it
produces, which a prepared corpus records and a run checks. For a Hugging Face tokenizer it is the SHA-256
of the canonical JSON of tokenizer.json (keys sorted, no whitespace): a file re-saved with other formatting
or key order keeps it, any change to the vocabulary, merges or normalisation changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

import tokenizers

BYTES = "bytes"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
EOS_TOKEN = "<|endoftext|>"  # of the tokenizers train_byte_bpe writes (GPT-2's)
# Where tokenizer_config.json names no EOS: the end-of-text tokens of the common families, first found wins.
_EOS_GUESSES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")
_BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<bos>")
_FIX = (
    "pass a tokenizer.json file, a directory holding one (a Hugging Face model directory), or 'bytes'; "
    "scripts/train_tokenizer.py --out=DIR trains one on local text"
)


class TokenizerError(ValueError):
    """A tokenizer path that cannot be used; the message names the path and the fix."""


class ByteTokenizer:
    """The tokens of jaxpar's byte-level corpora (data.source stdlib / text): token id = byte value.

    A prepared byte corpus (scripts/prepare_data.py --tokenizer=bytes) ends each document with byte 0
    (NUL, which text does not hold). Generation does not stop on it (`stop_token_ids` is empty): models
    trained on the stdlib corpus never saw it."""

    name = BYTES
    vocab_size = 256
    eos_id = 0
    bos_id = None
    chat_template = None
    stop_token_ids: tuple[int, ...] = ()
    sha256 = hashlib.sha256(b"jaxpar byte tokenizer: id = UTF-8 byte value, eos = 0").hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` from a tokenizer.json. Encoding adds no special tokens (the
    data pipeline adds EOS itself); decoding keeps them, as `transformers`' decode does by default."""

    def __init__(self, path: str):
        self.path = tokenizer_file(path)
        self.name = os.path.abspath(path)
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = f.read()
            canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            self.tokenizer = tokenizers.Tokenizer.from_str(raw)
        except Exception as error:  # OSError, bad UTF-8 or JSON, and the Rust parser's plain Exception
            raise TokenizerError(
                f"tokenizer file {self.path!r} cannot be loaded ({type(error).__name__}: {error}); it is not "
                f"a valid tokenizer.json (truncated or corrupt?). Replace it, or {_FIX}."
            ) from None
        self.sha256 = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        config = _read_json_beside(self.path, CONFIG_FILE) or {}
        special = _read_json_beside(self.path, SPECIAL_TOKENS_FILE) or {}
        self.eos_id = self._special_id(config, special, "eos_token", _EOS_GUESSES)
        self.bos_id = self._special_id(config, special, "bos_token", _BOS_GUESSES)
        self.chat_template = _chat_template(self.path, config)
        self.stop_token_ids: tuple[int, ...] = () if self.eos_id is None else (self.eos_id,)

    def _special_id(self, config: dict, special: dict, key: str, guesses: tuple[str, ...]) -> int | None:
        """The id of tokenizer_config.json's (or special_tokens_map.json's) `key`; where neither names
        one, the first of `guesses` that is a special token of the tokenizer."""
        for source in (config, special):
            if key in source:
                token = source[key]
                token = token.get("content") if isinstance(token, dict) else token
                if token is None:
                    return None
                token_id = self.tokenizer.token_to_id(token)
                if token_id is None:
                    raise TokenizerError(
                        f"{key} {token!r} named beside {self.path!r} is not in that tokenizer's vocabulary; "
                        f"fix {CONFIG_FILE} (or {SPECIAL_TOKENS_FILE}) there."
                    )
                return token_id
        specials = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        for token in guesses:
            if token in specials:
                return self.tokenizer.token_to_id(token)
        return None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


Tokenizer = ByteTokenizer | HFTokenizer


def tokenizer_file(path: str) -> str:
    """`path` itself, or `path`/tokenizer.json for a directory; TokenizerError naming the fix if absent."""
    if os.path.isdir(path):
        inside = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(inside):
            raise TokenizerError(f"tokenizer directory {path!r} holds no {TOKENIZER_FILE}; {_FIX}.")
        return inside
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer path {path!r} does not exist; {_FIX}.")
    return path


def load_tokenizer(spec: str) -> Tokenizer:
    """ "" or "bytes": the byte tokenizer; else a tokenizer.json or a directory holding one."""
    return ByteTokenizer() if spec in ("", BYTES) else HFTokenizer(spec)


def _read_json_beside(path: str, name: str) -> dict | None:
    beside = os.path.join(os.path.dirname(path), name)
    if not os.path.isfile(beside):
        return None
    try:
        with open(beside, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as error:
        raise TokenizerError(f"{beside!r} is not readable JSON ({error}); fix or delete it.") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{beside!r} holds {type(value).__name__}, not a JSON object; fix or delete it.")
    return value


def _chat_template(path: str, config: dict) -> str | None:
    """The chat template: chat_template.jinja beside tokenizer.json (transformers >= 4.43 writes it there),
    else tokenizer_config.json's `chat_template` when it is a single template."""
    beside = os.path.join(os.path.dirname(path), CHAT_TEMPLATE_FILE)
    if os.path.isfile(beside):
        with open(beside, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def save_tokenizer_files(tokenizer: Tokenizer, out: str) -> None:
    """Copies an HF tokenizer's files (tokenizer.json and the config files beside it) into `out`, so that
    `load_tokenizer(out)` gives the same tokenizer (same sha256); writes nothing for the byte tokenizer."""
    if not isinstance(tokenizer, HFTokenizer):
        return
    os.makedirs(out, exist_ok=True)
    source = os.path.dirname(tokenizer.path)
    for name, target in (
        (os.path.basename(tokenizer.path), TOKENIZER_FILE),
        (CONFIG_FILE, CONFIG_FILE),
        (SPECIAL_TOKENS_FILE, SPECIAL_TOKENS_FILE),
        (CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_FILE),
    ):
        if os.path.isfile(os.path.join(source, name)):
            with open(os.path.join(source, name), "rb") as f:
                content = f.read()
            with open(os.path.join(out, target) + ".tmp", "wb") as f:
                f.write(content)
            os.replace(os.path.join(out, target) + ".tmp", os.path.join(out, target))


def train_byte_bpe(
    texts: Iterable[str],
    vocab_size: int,
    out: str,
    *,
    length: int | None = None,
    min_frequency: int = 2,
    eos_token: str = EOS_TOKEN,
    show_progress: bool = True,
) -> HFTokenizer:
    """Trains a byte-level BPE (GPT-2 style: every byte is in the alphabet, so no text is unknown) on
    `texts` and writes `out`/tokenizer.json, tokenizer_config.json and special_tokens_map.json, which
    `transformers.AutoTokenizer.from_pretrained(out)` loads. `eos_token` is the only special token (id 0:
    the trainer numbers special tokens first). `length`: the number of texts, for the progress bar."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise TokenizerError(
            f"--vocab_size={vocab_size} is below the {len(alphabet)} byte tokens plus {eos_token!r} of a "
            f"byte-level BPE; use at least {len(alphabet) + 1}."
        )
    if os.path.exists(os.path.join(out, TOKENIZER_FILE)):
        raise TokenizerError(
            f"{os.path.join(out, TOKENIZER_FILE)!r} exists; give a new --out (nothing was overwritten)."
        )
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer, length=length)
    os.makedirs(out, exist_ok=True)
    tokenizer.save(os.path.join(out, TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "bos_token": None,
        "unk_token": None,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decode gives back the text exactly
    }
    for name, value in ((CONFIG_FILE, config), (SPECIAL_TOKENS_FILE, {"eos_token": eos_token})):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)
    return HFTokenizer(out)
