"""Tokenizers: a byte-level BPE trained by scripts/train_tokenizer.py loads in transformers' AutoTokenizer
and encodes and decodes exactly as jaxpar's HFTokenizer does; the byte tokenizer; the tokenizer hash;
missing and corrupt files give one clear error."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from jaxpar.data import corpus, tokenizer as tokenizer_lib
from jaxpar.data.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer
from run_testing import ROOT

# Text the tokenizer must get right: code, runs of spaces and tabs, accents, CJK, emoji (4-byte UTF-8),
# the EOS string typed as text, a lone combining mark, an empty string.
SAMPLES = [
    "def main(argv):\n    return 0\n",
    "    \t  trailing spaces   \n\n\n",
    "Héllo wörld, ça va? Ωμέγα",
    "日本語のテキスト、中文文本",
    "emoji 🙂🚀 and a flag 🇫🇷",
    "literal <|endoftext|> in text",
    "e\u0301",
    "",
]


def _corpus_texts() -> list[str]:
    """A small training corpus: a few stdlib modules plus the samples."""
    _, paths = corpus.stdlib_files()
    chosen = [p for p in paths if os.path.basename(os.path.dirname(p)) == "json"]
    return [open(p, encoding="utf-8").read() for p in chosen] + SAMPLES


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tok") / "bpe")
    tokenizer_lib.train_byte_bpe(_corpus_texts(), 400, out, show_progress=False)
    return out


def test_autotokenizer_loads_the_trained_tokenizer_and_encodes_identically(trained):
    from transformers import AutoTokenizer

    ours = load_tokenizer(trained)
    theirs = AutoTokenizer.from_pretrained(trained)
    assert ours.vocab_size == len(theirs) == 400
    assert ours.eos_id == theirs.eos_token_id == theirs.convert_tokens_to_ids("<|endoftext|>")
    assert ours.bos_id is None and theirs.bos_token_id is None
    merged = 0
    for text in [*SAMPLES, *_corpus_texts()[:2]]:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"] == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids) == text
        merged += len(ids) < len(text.encode())
    assert merged >= 5, "BPE merges should make most texts shorter than their bytes"
    with_eos = [*ours.encode("x = 1"), ours.eos_id]
    assert ours.decode(with_eos) == theirs.decode(with_eos) == "x = 1<|endoftext|>"


def test_the_script_trains_a_tokenizer_from_a_glob(tmp_path):
    for i, text in enumerate(_corpus_texts()):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    with open(tmp_path / "more.jsonl", "w") as f:
        f.writelines(json.dumps({"body": s}) + "\n" for s in SAMPLES)
    out = tmp_path / "tok"
    script = os.path.join(ROOT, "scripts", "train_tokenizer.py")
    args = [sys.executable, script, f"--input={tmp_path}/*", "--vocab_size=300", f"--out={out}"]
    done = subprocess.run([*args, "--text_key=body"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "vocab_size 300" in done.stderr
    assert sorted(os.listdir(out)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    tokenizer = load_tokenizer(str(out))
    assert tokenizer.vocab_size == 300 and tokenizer.decode(tokenizer.encode(SAMPLES[3])) == SAMPLES[3]
    # Running it again would overwrite the tokenizer: refused, one line naming the file.
    again = subprocess.run([*args, "--text_key=body"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1] == (
        f"error: {str(out / 'tokenizer.json')!r} exists; give a new --out (nothing was overwritten)."
    )
    # A .jsonl whose records lack --text_key: one line naming file:line and the keys it has.
    bad = subprocess.run([*args[:-1], f"--out={tmp_path}/x"], capture_output=True, text=True, timeout=120)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 1 and "more.jsonl:1" in last and "'text'" in last and "['body']" in last


def test_byte_tokenizer():
    tokenizer = load_tokenizer("")
    assert isinstance(tokenizer, ByteTokenizer) and isinstance(load_tokenizer("bytes"), ByteTokenizer)
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == 256 and tokenizer.eos_id == 0
    assert tokenizer.sha256 == ByteTokenizer().sha256 and len(tokenizer.sha256) == 64


def test_the_hash_follows_the_content_not_the_formatting(trained, tmp_path):
    original = HFTokenizer(trained)
    raw = json.load(open(os.path.join(trained, "tokenizer.json"), encoding="utf-8"))
    # The same tokenizer, re-serialised with other indentation and key order: same hash, same ids.
    (tmp_path / "same").mkdir()
    with open(tmp_path / "same" / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(dict(reversed(list(raw.items()))), f, indent=4, ensure_ascii=True)
    same = HFTokenizer(str(tmp_path / "same"))
    assert same.sha256 == original.sha256
    assert same.encode(SAMPLES[2]) == original.encode(SAMPLES[2])
    # One merge fewer: other ids for some text, other hash.
    raw["model"]["merges"] = raw["model"]["merges"][:-1]
    (tmp_path / "other").mkdir()
    with open(tmp_path / "other" / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(raw, f)
    assert HFTokenizer(str(tmp_path / "other")).sha256 != original.sha256
    # Without the config files beside it, EOS is found among the special tokens.
    shutil.copy(os.path.join(trained, "tokenizer.json"), tmp_path / "alone.json")
    alone = load_tokenizer(str(tmp_path / "alone.json"))
    assert alone.eos_id == original.eos_id and alone.sha256 == original.sha256


def test_save_tokenizer_files_round_trips(trained, tmp_path):
    original = HFTokenizer(trained)
    tokenizer_lib.save_tokenizer_files(original, str(tmp_path / "copy"))
    copy = HFTokenizer(str(tmp_path / "copy"))
    assert (copy.sha256, copy.eos_id, copy.vocab_size) == (original.sha256, original.eos_id, 400)


def _write(directory, text: str, name: str = "tokenizer.json") -> str:
    (directory / "tokenizer.json").write_text(text)
    return str(directory / name)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: str(d / "nowhere"), ["nowhere", "does not exist", "train_tokenizer.py", "'bytes'"]),
        (lambda d: str(d), ["holds no tokenizer.json", "train_tokenizer.py"]),
        (
            lambda d: _write(d, '{"model": {"type": "BPE", "vocab": {"a"'),
            ["tokenizer.json", "not a valid tokenizer.json", "corrupt"],
        ),
        (
            lambda d: _write(d, '{"version": "1.0"}', name=""),
            ["tokenizer.json", "not a valid tokenizer.json"],
        ),
    ],
    ids=["missing", "empty_dir", "truncated", "not_a_tokenizer"],
)
def test_a_bad_tokenizer_path_is_one_clear_error(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(TokenizerError) as error:
        load_tokenizer(path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message
    for word in words:
        assert word in message


def test_a_named_eos_that_is_not_in_the_vocabulary_is_an_error(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(TokenizerError, match=r"eos_token '</s>'.*not in that tokenizer's vocabulary"):
        load_tokenizer(str(tmp_path / "tok"))


def test_too_small_a_vocabulary_is_refused(tmp_path):
    with pytest.raises(TokenizerError, match=r"--vocab_size=200 .*use at least 257"):
        tokenizer_lib.train_byte_bpe(["x"], 200, str(tmp_path / "t"), show_progress=False)
