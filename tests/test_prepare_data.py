"""scripts/prepare_data.py and prepared corpora: .txt, .jsonl, .jsonl.gz and .parquet inputs (read back
independently with `datasets`) give exactly each document's ids plus EOS, whatever the number of worker
processes; the manifest's checks (vocabulary, dtype, tokenizer hash, truncated shard) each give one clear
error before anything compiles; a tiny LM trains on a prepared corpus and generates text decoded with the
tokenizer it trained with."""

import collections
import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from infer_testing import greedy_reference
from test_checkpoint_faults import tiny_run
from test_data import _expected_chunks, _one_pass_chunks

from jaxpar.config import ConfigError, DataConfig
from jaxpar.data import corpus, tokenizer as tokenizer_lib
from jaxpar.data.corpus import CorpusError
from jaxpar.infer import model as model_lib
from jaxpar.infer.text import TextStream
from jaxpar.train import data, loop
from run_testing import ROOT, curve

VOCAB = 320


def _texts() -> list[str]:
    """Documents of very different sizes: stdlib modules, short lines, unicode, an empty one."""
    _, paths = corpus.stdlib_files()
    modules = [
        open(p, encoding="utf-8").read() for p in paths if os.path.basename(os.path.dirname(p)) == "json"
    ]
    return [*modules, "short", "", "Ünïcödé 日本語 🙂", "x = 1\n" * 50, "\n\n"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tok") / "bpe")
    tokenizer_lib.train_byte_bpe(_texts(), VOCAB, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> str:
    """One file of each kind, in a folder; the documents spread over them."""
    folder = tmp_path_factory.mktemp("inputs")
    texts = _texts()
    (folder / "a.txt").write_text(texts[0], encoding="utf-8")
    (folder / "b.txt").write_text(texts[-3], encoding="utf-8")
    with open(folder / "c.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(texts[1:4]):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
        f.write("\n")  # a blank line is no document
    with gzip.open(folder / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "meta": {"n": len(t)}}) + "\n" for t in texts[4:7])
    table = pa.table({"text": texts[2:], "n": list(range(len(texts) - 2))})
    pq.write_table(table, folder / "e.parquet", row_group_size=2)
    return str(folder)


def _reference_documents(path: str, cache: str) -> list[str]:
    """The documents of one input file as `datasets` reads them (txt: the whole file)."""
    import datasets

    if path.endswith(".txt"):
        return [open(path, encoding="utf-8").read()]
    builder = "parquet" if path.endswith(".parquet") else "json"
    return datasets.load_dataset(builder, data_files=[path], split="train", cache_dir=cache)["text"]


def _stream(out: str) -> np.ndarray:
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    dtype = np.dtype(manifest["dtype"])
    return np.concatenate([np.fromfile(os.path.join(out, s["file"]), dtype) for s in manifest["shards"]])


@pytest.fixture(scope="module")
def prepared(tokenizer_dir, inputs, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("prepared") / "out")
    corpus.prepare(f"{inputs}/*", tokenizer_dir, out, workers=2, shard_tokens=2000, batch_chars=3000)
    return out


def test_prepared_tokens_are_each_document_encoded_plus_eos(prepared, tokenizer_dir, inputs, tmp_path):
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
    manifest = json.load(open(os.path.join(prepared, "manifest.json")))
    paths = sorted(os.path.join(inputs, name) for name in os.listdir(inputs))
    assert [s["path"] for s in manifest["sources"]] == paths
    expected = []
    for path, source in zip(paths, manifest["sources"]):
        docs = _reference_documents(path, str(tmp_path / "hf_cache"))
        ids = [i for doc in docs for i in [*tokenizer.encode(doc), tokenizer.eos_id]]
        assert (source["documents"], source["tokens"]) == (len(docs), len(ids)), path
        expected += ids
    assert manifest["documents"] == 2 + 3 + 3 + len(_texts()) - 2
    np.testing.assert_array_equal(_stream(prepared), expected)
    assert manifest["tokens"] == len(expected) == sum(s["tokens"] for s in manifest["shards"])
    assert len(manifest["shards"]) > 2, "shard_tokens=2000 should have cut the corpus into several shards"
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == VOCAB
    assert manifest["max_token_id"] == max(expected) and manifest["eos_id"] == tokenizer.eos_id
    assert manifest["tokenizer"]["sha256"] == tokenizer.sha256


def test_workers_do_not_change_the_output(prepared, tokenizer_dir, inputs, tmp_path):
    out = str(tmp_path / "single")
    manifest = corpus.prepare(
        f"{inputs}/*", tokenizer_dir, out, workers=0, shard_tokens=2000, batch_chars=3000
    )
    assert manifest["shards"] == json.load(open(os.path.join(prepared, "manifest.json")))["shards"]
    for shard in manifest["shards"]:
        with (
            open(os.path.join(out, shard["file"]), "rb") as a,
            open(os.path.join(prepared, shard["file"]), "rb") as b,
        ):
            assert a.read() == b.read()


def test_the_script_prepares_byte_tokens_with_a_progress_bar(inputs, tmp_path):
    out = tmp_path / "bytes"
    script = os.path.join(ROOT, "scripts", "prepare_data.py")
    args = [
        sys.executable,
        script,
        f"--input={inputs}/*.jsonl*",
        "--tokenizer=bytes",
        f"--out={out}",
        "--workers=2",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "tok/s" in done.stderr and "6 documents in 2 file(s)" in done.stderr
    docs = [json.loads(line)["text"] for line in open(f"{inputs}/c.jsonl") if line.strip()]
    docs += [json.loads(line)["text"] for line in gzip.open(f"{inputs}/d.jsonl.gz", "rt")]
    expected = [b for doc in docs for b in [*doc.encode("utf-8"), 0]]
    np.testing.assert_array_equal(_stream(str(out)), expected)
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1] == (
        f"error: --out={str(out)!r} is not empty; give a new directory (nothing in it was changed)."
    )


@pytest.mark.parametrize(
    "setup, pattern, words",
    [
        (lambda d: None, "{d}/nothing*", ["nothing*", "matches no files"]),
        (lambda d: (d / "x.csv").write_text("a,b"), "{d}/*", ["x.csv", "cannot read", "Narrow the glob"]),
        (
            lambda d: (d / "x.jsonl").write_text('{"body": "hi"}\n'),
            "{d}/*",
            ["x.jsonl:1", "'text'", "['body']"],
        ),
        (lambda d: (d / "x.jsonl").write_text('{"text": "hi"}\n{oops\n'), "{d}/*", ["x.jsonl:2", "not JSON"]),
        (
            lambda d: pq.write_table(pa.table({"body": ["hi"]}), d / "x.parquet"),
            "{d}/*",
            ["x.parquet", "no column 'text'", "['body']", "--text_key"],
        ),
    ],
    ids=["no_match", "unknown_suffix", "missing_key", "bad_json", "missing_column"],
)
def test_bad_inputs_are_one_clear_error(tmp_path, setup, pattern, words):
    (tmp_path / "in").mkdir()
    setup(tmp_path / "in")
    with pytest.raises(CorpusError) as error:
        corpus.prepare(pattern.format(d=tmp_path / "in"), "bytes", str(tmp_path / "out"))
    assert "\n" not in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_training_data_reads_the_manifest(prepared, tokenizer_dir):
    cfg = DataConfig(source="tokens", path=prepared, shuffle=False)
    assert data.vocab_size(cfg) == VOCAB
    assert data.run_tokenizer(cfg).sha256 == tokenizer_lib.load_tokenizer(tokenizer_dir).sha256
    data.check_token_ids(cfg, VOCAB)
    # One pass over both splits holds every block of every shard, cut into chunks, exactly once.
    manifest = json.load(open(f"{prepared}/manifest.json"))
    block = min(data.TOKEN_DOC_LEN, max(data.MIN_BLOCK, -(-manifest["tokens"] // data.MIN_BLOCKS)))
    assert block < manifest["tokens"] // 8, "the corpus should be cut into many documents"
    expected = collections.Counter()
    for shard in manifest["shards"]:
        tokens = np.fromfile(os.path.join(prepared, shard["file"]), np.uint16)
        for start in range(0, len(tokens), block):
            expected.update(_expected_chunks(tokens[start : start + block], 64))
    got = [c for split in ("train", "eval") for c in _one_pass_chunks(cfg, split, seq_len=64, batch_size=4)]
    assert collections.Counter(got) == expected
    # The manifest file itself names the corpus as well as its directory.
    assert data.vocab_size(dataclasses.replace(cfg, path=f"{prepared}/manifest.json")) == VOCAB


def test_manifest_vocabulary_larger_than_the_model_is_an_error(prepared):
    cfg = DataConfig(source="tokens", path=prepared)
    with pytest.raises(ConfigError) as error:
        data.check_token_ids(cfg, vocab_size=256)
    message = str(error.value)
    assert f"{prepared}/manifest.json" in message and f"tokenizer of {VOCAB} tokens" in message
    assert "model.vocab_size=256" in message and f"--config.model.vocab_size to at least {VOCAB}" in message


def test_manifest_dtype_mismatch_is_an_error(prepared, tmp_path):
    with pytest.raises(
        ConfigError, match=r"data.token_dtype='uint32'.*manifest.json.*uint16.*token_dtype=uint16"
    ):
        data.check_data(DataConfig(source="tokens", path=prepared, token_dtype="uint32"))
    # A shard cut short (or rewritten with another dtype) no longer matches the manifest's count.
    broken = tmp_path / "broken"
    os.makedirs(broken)
    for name in os.listdir(prepared):
        content = open(os.path.join(prepared, name), "rb").read()
        (broken / name).write_bytes(content[:-3] if name == "shard_00001.bin" else content)
    with pytest.raises(ConfigError, match=r"shard_00001\.bin.* has \d+ bytes.*truncated.*another dtype"):
        data.check_data(DataConfig(source="tokens", path=str(broken)))


def test_a_directory_without_a_sound_manifest_is_an_error(prepared, tmp_path):
    shutil.copytree(prepared, tmp_path / "c")
    os.remove(tmp_path / "c" / "manifest.json")
    with pytest.raises(
        ConfigError, match=r"is a directory without the manifest.json.*prepare_data.py.*\*\.bin"
    ):
        data.check_data(DataConfig(source="tokens", path=str(tmp_path / "c")))
    (tmp_path / "c" / "manifest.json").write_text('{"tokens": 12, "dtype": "uint16"')
    with pytest.raises(
        ConfigError, match=r"manifest .*manifest.json' cannot be read .*rerun scripts/prepare_data"
    ):
        data.check_data(DataConfig(source="tokens", path=str(tmp_path / "c")))


def test_manifest_tokenizer_hash_mismatch_is_an_error(prepared, tmp_path):
    other = str(tmp_path / "other")
    tokenizer_lib.train_byte_bpe(["completely different text " * 20], 260, other, show_progress=False)
    for tokenizer in (other, "bytes"):
        cfg = DataConfig(source="tokens", path=prepared, tokenizer=tokenizer)
        with pytest.raises(ConfigError) as error:
            data.check_data(cfg)
        message = str(error.value)
        assert f"data.tokenizer={tokenizer!r}" in message and "is not the tokenizer that wrote" in message
        assert "manifest.json" in message and "--config.data.tokenizer=" in message


def test_text_source_with_a_tokenizer(tokenizer_dir, inputs):
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
    cfg = DataConfig(source="text", path=f"{inputs}/*.txt", tokenizer=tokenizer_dir, shuffle=False)
    assert data.vocab_size(cfg) == VOCAB
    with pytest.raises(ConfigError, match=rf"has {VOCAB} tokens, but model.vocab_size=256.*at least {VOCAB}"):
        data.check_token_ids(cfg, 256)
    docs = {
        name: [*tokenizer.encode(open(f"{inputs}/{name}").read()), tokenizer.eos_id]
        for name in ("a.txt", "b.txt")
    }
    expected = collections.Counter(c for doc in docs.values() for c in _expected_chunks(np.array(doc), 256))
    got = [c for split in ("train", "eval") for c in _one_pass_chunks(cfg, split, seq_len=256, batch_size=4)]
    assert collections.Counter(got) == expected


def test_tiny_lm_trains_on_prepared_data_and_generates_with_its_tokenizer(prepared, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    base = tiny_run(steps=4, checkpoint_every=0)
    run = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, vocab_size=VOCAB),
        data=DataConfig(source="tokens", path=prepared),
    )
    workdir = str(tmp_path / "run")
    loop.train(run, workdir)
    losses = [loss for loss, *_ in curve(workdir).values()]
    assert len(losses) == 4 and all(np.isfinite(losses))
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
    record = json.load(open(os.path.join(workdir, "tokenizer", "jaxpar_tokenizer.json")))
    assert record["sha256"] == tokenizer.sha256 and record["vocab_size"] == VOCAB

    model = model_lib.load_workdir(workdir, model_lib.inference_mesh())
    assert model.tokenizer.sha256 == tokenizer.sha256 and model.stop_token_ids == (tokenizer.eos_id,)
    prompt = model.tokenizer.encode("def dumps(obj")
    ids = greedy_reference(model, prompt, 6)
    stream = TextStream(model.tokenizer)
    for token in ids:
        stream.push(token)
    stream.flush()
    reference = AutoTokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))
    assert stream.text == reference.decode(ids) == tokenizer.decode(ids)

    # Resuming the workdir with another tokenizer would give its checkpoint ids that mean other text.
    other = dataclasses.replace(
        run, data=DataConfig(source="text", path=f"{prepared}/../*", tokenizer="bytes")
    )
    with pytest.raises(
        ConfigError, match=r"was trained with tokenizer .*this run's is 'bytes'.*new --workdir"
    ):
        data.record_tokenizer(other.data, workdir)
