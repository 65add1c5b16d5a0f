"""The data pipeline: packing invariants, nothing lost or duplicated, determinism, checkpoint replay,
train/eval split, per-process slicing and the errors a bad data config gives."""

import collections
import json
import time

import numpy as np
import pytest

from jaxpar.config import ConfigError, DataConfig
from jaxpar.train import data

SEQ_LEN = 16
# Lengths around the chunk boundaries (seq_len + 1 tokens per full chunk) and well past them; the empty
# file and the 1-byte file have no next-token pair and so contribute nothing.
DOC_LENGTHS = [0, 1, 2, 5, 16, 17, 18, 33, 34, 40, 63, 64, 65, 100, 130, 300, 7, 12, 250, 3]
KEYS = ("inputs", "targets", "segment_ids", "positions")


@pytest.fixture
def text_docs(tmp_path):
    """Random byte documents written as files; returns (glob, {name: bytes})."""
    rng = np.random.default_rng(0)
    docs = {}
    for i, length in enumerate(DOC_LENGTHS):
        content = rng.integers(0, 256, size=length, dtype=np.uint8).tobytes()
        # Nested directory so the glob's ** is exercised.
        path = tmp_path / "corpus" / f"d{i % 3}" / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        docs[f"d{i % 3}/doc{i:02d}.txt"] = content
    return str(tmp_path / "corpus" / "**" / "*.txt"), docs


def _text_cfg(pattern, **kw):
    return DataConfig(source="text", path=pattern, eval_fraction=0.2, **kw)


def _expected_chunks(tokens, seq_len):
    """A document cut into chunks of seq_len pairs (seq_len + 1 tokens); neighbours share one token."""
    n_pairs = len(tokens) - 1
    n_chunks = -(-n_pairs // seq_len)
    ends = [min((i + 1) * seq_len, n_pairs) + 1 for i in range(n_chunks)]
    return [tuple(map(int, tokens[i * seq_len : end])) for i, end in enumerate(ends)]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(KEYS) == set(y)
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _segments_checked(batch):
    """Checks every packing invariant of a batch and returns the token chunk of each segment."""
    chunks = []
    for row in range(batch["inputs"].shape[0]):
        inputs, targets, seg, pos = (batch[k][row] for k in KEYS)
        # Segments are contiguous spans numbered 1, 2, ... followed by trailing padding.
        used = seg > 0
        n_used = int(used.sum())
        assert used[:n_used].all() and not used[n_used:].any()
        assert (np.diff(seg[:n_used]) >= 0).all()
        assert set(np.unique(seg[:n_used])) == set(range(1, int(seg.max()) + 1))
        # Padding is token 0 with position 0.
        for padded in (inputs, targets, pos):
            assert (padded[~used] == 0).all()
        for s in range(1, int(seg.max()) + 1):
            mask = seg == s
            np.testing.assert_array_equal(pos[mask], np.arange(mask.sum()))
            # Targets are the next inputs within a segment, never across a segment boundary.
            np.testing.assert_array_equal(targets[mask][:-1], inputs[mask][1:])
            chunks.append(tuple(inputs[mask].tolist() + [int(targets[mask][-1])]))
    return chunks


def _one_pass_chunks(cfg, split, seq_len=SEQ_LEN, batch_size=4):
    batches = list(data.make_batches(cfg, split=split, seq_len=seq_len, batch_size=batch_size, repeat=False))
    for batch in batches:
        for k in KEYS:
            assert batch[k].shape == (batch_size, seq_len) and batch[k].dtype == np.int32
    return [chunk for batch in batches for chunk in _segments_checked(batch)]


def test_packing_keeps_every_token_and_splits_by_document(text_docs):
    pattern, docs = text_docs
    cfg = _text_cfg(pattern, shuffle=False)
    doc_chunks = {name: _expected_chunks(content, SEQ_LEN) for name, content in docs.items()}
    chunk_to_doc = {chunk: name for name, chunks in doc_chunks.items() for chunk in chunks}
    expected = collections.Counter(chunk for chunks in doc_chunks.values() for chunk in chunks)

    got = {split: _one_pass_chunks(cfg, split) for split in ("train", "eval")}

    # Every pair of every document appears exactly once over one pass of both splits.
    assert collections.Counter(got["train"] + got["eval"]) == expected
    train_docs = {chunk_to_doc[c] for c in got["train"]}
    eval_docs = {chunk_to_doc[c] for c in got["eval"]}
    assert train_docs and eval_docs and not train_docs & eval_docs
    # The split is whole documents: each document's chunks all land on one side.
    for split, split_docs in (("train", train_docs), ("eval", eval_docs)):
        wanted = [chunk for name in split_docs for chunk in doc_chunks[name]]
        assert collections.Counter(got[split]) == collections.Counter(wanted)


def test_batches_are_deterministic_and_depend_on_the_seed(text_docs):
    pattern, _ = text_docs

    def first_batches(seed):
        cfg = _text_cfg(pattern, seed=seed)
        return _take(data.make_batches(cfg, split="train", seq_len=SEQ_LEN, batch_size=4), 30)

    _assert_same_batches(first_batches(0), first_batches(0))
    with pytest.raises(AssertionError):
        _assert_same_batches(first_batches(0), first_batches(1))


@pytest.mark.parametrize("n_before", [0, 5, 23])
def test_state_round_trips_through_json(text_docs, n_before):
    pattern, _ = text_docs
    cfg = _text_cfg(pattern, seed=3)

    def fresh():
        return data.make_batches(cfg, split="train", seq_len=SEQ_LEN, batch_size=4)

    uninterrupted = fresh()
    _take(uninterrupted, n_before)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    restored = fresh()
    _take(restored, 2)  # restoring must also rewind an iterator that has moved on
    restored.set_state(state)
    # 40 batches cross packing groups and epochs of this small corpus.
    _assert_same_batches(_take(restored, 40), _take(uninterrupted, 40))


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("split,repeat", [("train", True), ("eval", False)])
def test_process_slices_concatenate_to_the_global_batch(text_docs, process_count, split, repeat):
    pattern, _ = text_docs
    cfg = _text_cfg(pattern)
    kw = dict(split=split, seq_len=SEQ_LEN, batch_size=8, repeat=repeat)
    global_batches = _take(data.make_batches(cfg, **kw), 6) if repeat else list(data.make_batches(cfg, **kw))
    per_process = [
        _take(data.make_batches(cfg, process_index=i, process_count=process_count, **kw), len(global_batches))
        for i in range(process_count)
    ]
    for step, global_batch in enumerate(global_batches):
        for k in KEYS:
            local = [per_process[i][step][k] for i in range(process_count)]
            assert local[0].shape == (8 // process_count, SEQ_LEN)
            np.testing.assert_array_equal(np.concatenate(local), global_batch[k])


def test_stdlib_batches(tmp_path):
    cfg = DataConfig()
    assert data.vocab_size(cfg) == 256
    start = time.perf_counter()
    data.check_data(cfg)
    train = data.make_batches(cfg, split="train", seq_len=128, batch_size=8)
    first = next(train)
    assert time.perf_counter() - start < 5.0, "the training job's first batch should not wait on the data"
    for batch in [first, next(data.make_batches(cfg, split="eval", seq_len=128, batch_size=8))]:
        for k in KEYS:
            assert batch[k].shape == (8, 128) and batch[k].dtype == np.int32
        assert 0 <= batch["inputs"].min() and batch["inputs"].max() < 256
        assert (batch["segment_ids"] > 0).mean() > 0.9, "rows should be mostly tokens, not padding"
        _segments_checked(batch)


def test_tokens_source_round_trips_uint16(tmp_path):
    rng = np.random.default_rng(1)
    # Three documents of TOKEN_DOC_LEN tokens (the last one shorter), values well past a byte.
    tokens = rng.integers(0, 2**16, size=2 * data.TOKEN_DOC_LEN + 1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    cfg = DataConfig(source="tokens", path=str(tmp_path / "*.bin"), token_dtype="uint16", shuffle=False)
    data.check_data(cfg)
    assert data.vocab_size(cfg) is None

    seq_len = 256
    got = [c for split in ("train", "eval") for c in _one_pass_chunks(cfg, split, seq_len, batch_size=16)]
    docs = [tokens[i : i + data.TOKEN_DOC_LEN] for i in range(0, len(tokens), data.TOKEN_DOC_LEN)]
    expected = [chunk for doc in docs for chunk in _expected_chunks(doc, seq_len)]
    assert collections.Counter(got) == collections.Counter(expected)
    assert max(max(c) for c in got) > 255


def test_missing_glob_is_a_config_error(tmp_path):
    pattern = str(tmp_path / "nowhere" / "*.txt")
    cfg = DataConfig(source="text", path=pattern)
    with pytest.raises(ConfigError, match="nowhere"):
        data.check_data(cfg)
    with pytest.raises(ConfigError, match="nowhere"):
        data.make_batches(cfg, split="train", seq_len=SEQ_LEN, batch_size=4)


def test_token_file_with_odd_byte_count_is_a_config_error(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "good.bin")
    (tmp_path / "bad.bin").write_bytes(b"\x00" * 201)
    cfg = DataConfig(source="tokens", path=str(tmp_path / "*.bin"), token_dtype="uint16")
    with pytest.raises(ConfigError, match=r"bad\.bin.*201 bytes.*token_dtype"):
        data.check_data(cfg)


def test_single_document_cannot_be_split(tmp_path):
    (tmp_path / "only.txt").write_bytes(b"just one document")
    with pytest.raises(ConfigError, match="at least 2"):
        data.check_data(DataConfig(source="text", path=str(tmp_path / "*.txt")))


def _tokens_cfg(tmp_path, token_dtype):
    return DataConfig(source="tokens", path=str(tmp_path / "*.bin"), token_dtype=token_dtype)


def test_token_ids_past_the_vocabulary_are_a_config_error(tmp_path):
    rng = np.random.default_rng(2)
    rng.integers(0, 1000, size=5000, dtype=np.uint16).tofile(tmp_path / "a.bin")
    tokens = rng.integers(0, 1000, size=3 * data.TOKEN_DOC_LEN, dtype=np.uint16)
    tokens[data.TOKEN_DOC_LEN + 17] = 1234  # one id past the vocabulary, far into the file
    tokens.tofile(tmp_path / "b.bin")
    cfg = _tokens_cfg(tmp_path, "uint16")
    data.check_token_ids(cfg, vocab_size=1235)  # every id < vocab_size: fine
    with pytest.raises(ConfigError, match=r"b\.bin.*1234.*vocab_size=1234.*token_dtype"):
        data.check_token_ids(cfg, vocab_size=1234)
    # A scan in small chunks sees the same id, with memory bounded by the chunk.
    with pytest.raises(ConfigError, match=r"b\.bin.*1234"):
        data.check_token_ids(cfg, vocab_size=1000, chunk_tokens=4096)


def test_tokens_read_with_the_wrong_dtype_are_a_config_error(tmp_path):
    ids = np.random.default_rng(3).integers(0, 32000, size=3 * data.TOKEN_DOC_LEN)  # >= 2 docs either way
    ids.astype(np.uint16).tofile(tmp_path / "written_as_uint16.bin")
    # uint16 ids read as uint32 pair up into ids far past the vocabulary.
    with pytest.raises(ConfigError, match=r"written_as_uint16\.bin.*token_dtype='uint32'.*uint16"):
        data.check_token_ids(_tokens_cfg(tmp_path, "uint32"), vocab_size=32000)
    (tmp_path / "written_as_uint16.bin").unlink()
    ids.astype(np.uint32).tofile(tmp_path / "written_as_uint32.bin")
    # uint32 ids read as uint16 stay below the vocabulary, but every other one is a zero high half.
    with pytest.raises(ConfigError, match=r"written_as_uint32\.bin.*token_dtype='uint16'.*uint32"):
        data.check_token_ids(_tokens_cfg(tmp_path, "uint16"), vocab_size=32000)
    data.check_token_ids(_tokens_cfg(tmp_path, "uint32"), vocab_size=32000)


def test_byte_sources_need_no_token_scan(text_docs):
    pattern, _ = text_docs
    data.check_token_ids(_text_cfg(pattern), vocab_size=256)
