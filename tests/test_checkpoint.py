"""Checkpointer round trips, including leaves orbax cannot store itself; checksums that catch every
damaged byte on any mesh; one short message per restore failure, the details in a log file."""

import json
import logging
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpar.train.checkpoint import (
    RESTORE_LOG,
    Checkpointer,
    CheckpointError,
    CorruptCheckpointError,
    fingerprint,
)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _files(root) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_zero_size_leaves_round_trip(tmp_path):
    state = {
        "goals": jnp.zeros((4, 3, 0)),
        "params": {"w": jnp.arange(6.0).reshape(2, 3)},
        "step": jnp.int32(7),
    }
    checkpointer = Checkpointer(str(tmp_path), keep=2)
    checkpointer.save(3, state, {"position": 11})
    checkpointer.wait()
    restored, data = checkpointer.restore(3, _abstract(state))
    checkpointer.close()
    assert data == {"position": 11}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


# --- checksums -----------------------------------------------------------------------------------------


def _mesh(shape):
    return jax.make_mesh(shape, ("a", "b"), devices=jax.devices()[: int(np.prod(shape))])


def _state(mesh):
    """A float leaf big enough that orbax stores it in a data file (smaller values are inlined in its
    index, which has its own checksum), and the small dtypes a train state holds."""
    rng = np.random.default_rng(0)
    return {
        "params": {
            "w": jax.device_put(rng.standard_normal((64, 64), np.float32), NamedSharding(mesh, P("a", "b")))
        },
        "scale": jnp.asarray(rng.standard_normal(16), jnp.bfloat16),
        "step": jnp.int32(7),
        "mask": jnp.asarray([True, False, True]),
        "empty": jnp.zeros((3, 0)),
    }


@pytest.fixture
def saved(tmp_path):
    """Steps 1 and 2 of the same state saved on a (4, 2) mesh: (directory, state)."""
    state = _state(_mesh((4, 2)))
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
    checkpointer.save(1, state, {"position": 1})
    checkpointer.save(2, state, {"position": 2})
    checkpointer.close()
    return tmp_path / "checkpoints", state


def flip_one_bit(step_dir, restore, want) -> str:
    """Flips one bit of the largest array data file under step_dir/state so that restore() fails its
    checksum; returns the message. Bits at 1/16 .. 15/16 of the file are tried in turn: one whose flip
    restore() accepts must give back `want` bitwise (orbax leaves bytes that no value reads), one that
    breaks a storage index (which carries its own checksum) is put back. Before checksums, a flipped
    bit in a value restored silently wrong: zstd frames carry no checksum."""
    victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    original = victim.read_bytes()
    for k in range(1, 16):
        data = bytearray(original)
        data[len(data) * k // 16] ^= 0x01
        victim.write_bytes(bytes(data))
        try:
            got = restore()
        except CorruptCheckpointError as error:
            if "does not match the checksum" in str(error):
                return str(error)
        else:
            jax.tree.map(np.testing.assert_array_equal, got, want)  # never silently wrong
        victim.write_bytes(original)
    raise AssertionError(f"no flipped bit of {victim} changed a value")


@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.int8, jnp.uint8, jnp.bool_]
)
def test_fingerprint_sees_every_single_element_change_on_any_mesh(dtype):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, (8, 4)) if dtype == jnp.bool_ else rng.standard_normal((8, 4)) * 50
    x = np.asarray(jnp.asarray(x).astype(dtype))
    fp = jax.jit(fingerprint)
    want = np.asarray(fp(jnp.asarray(x)))
    for shape, spec in [((4, 2), P("a", "b")), ((2, 4), P("b", "a")), ((8, 1), P("a", None))]:
        placed = jax.device_put(x, NamedSharding(_mesh(shape), spec))
        np.testing.assert_array_equal(np.asarray(fp(placed)), want)  # the mesh does not enter
    variants = np.repeat(x[None], x.size, axis=0)
    flat = variants.reshape(x.size, -1)
    index = np.arange(x.size)
    flat[index, index] = ~flat[index, index] if dtype == jnp.bool_ else flat[index, index] + 1
    got = np.asarray(jax.jit(jax.vmap(fingerprint))(jnp.asarray(variants)))
    assert not (got == want).all(axis=1).any()  # every single changed element changes the fingerprint


def test_flipped_bit_is_named_as_corrupt_and_nothing_changes(saved):
    directory, state = saved
    restore = lambda: Checkpointer(str(directory), keep=3).restore(2, _abstract(state))[0]
    before = _files(directory)
    message = flip_one_bit(directory / "2", restore, state)
    assert message.startswith(f"checkpoint step 2 in {directory} could not be restored: params/w does not")
    assert message.endswith(f"Full error: {os.path.join(str(directory), RESTORE_LOG)}")
    after = _files(directory)
    assert after.pop(os.path.join(str(directory), RESTORE_LOG))  # the details; nothing else changed
    assert after.keys() == before.keys()
    assert sum(after[k] != before[k] for k in after) == 1  # the flipped file itself


def test_plausible_but_wrong_data_position_is_caught(saved):
    directory, state = saved
    (directory / "2" / "data" / "metadata").write_text(json.dumps({"position": 1}))
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 .*the data position .* does not match"):
        Checkpointer(str(directory), keep=3).restore(2, _abstract(state))


def test_corrupt_step_stops_or_falls_back_to_the_newest_intact_one(saved, caplog):
    directory, state = saved
    flip_one_bit(
        directory / "2", lambda: Checkpointer(str(directory), 3).restore(2, _abstract(state))[0], state
    )
    before = {k: v for k, v in _files(directory).items() if not k.endswith(RESTORE_LOG)}
    with pytest.raises(CheckpointError, match="checkpoint step 2 .* does not match the checksum"):
        Checkpointer(str(directory), keep=3).restore_latest(_abstract(state), on_corrupt="stop")
    assert {k: v for k, v in _files(directory).items() if not k.endswith(RESTORE_LOG)} == before

    checkpointer = Checkpointer(str(directory), keep=3)
    with caplog.at_level(logging.WARNING, logger="jaxpar.train.checkpoint"):
        step, restored, data = checkpointer.restore_latest(_abstract(state), on_corrupt="fallback")
    assert (step, data) == (1, {"position": 1})
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert "checkpoint step 2 is corrupt; resuming from step 1" in caplog.text
    # Moved aside, byte for byte, so a resumed run can save step 2 again; never deleted.
    moved = {k.replace(os.sep + "corrupt" + os.sep, os.sep): v for k, v in _files(directory).items()}
    assert {k: v for k, v in moved.items() if not k.endswith(RESTORE_LOG)} == before
    assert checkpointer.latest_step() == 1
    checkpointer.save(2, state, {"position": 2})
    checkpointer.close()
    assert Checkpointer(str(directory), keep=3).restore_latest(_abstract(state))[0] == 2


def test_restores_verified_onto_another_mesh(saved):
    directory, state = saved
    for mesh, spec in [(_mesh((2, 4)), P("b", None)), (_mesh((1, 1)), P())]:
        abstract = _abstract(state)
        abstract["params"]["w"] = jax.ShapeDtypeStruct(
            (64, 64), jnp.float32, sharding=NamedSharding(mesh, spec)
        )
        restored, _ = Checkpointer(str(directory), keep=3).restore(2, abstract)
        assert restored["params"]["w"].sharding == abstract["params"]["w"].sharding
        jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_checkpoint_without_checksums_restores_with_a_warning(saved, caplog):
    directory, state = saved
    shutil.rmtree(directory / "2" / "checksums")  # as saved before checksums existed
    with caplog.at_level(logging.WARNING, logger="jaxpar.train.checkpoint"):
        restored, _ = Checkpointer(str(directory), keep=3).restore(2, _abstract(state))
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    [record] = caplog.records
    assert "no checksums" in record.getMessage() and "\n" not in record.getMessage()


# --- one short message per cause ---------------------------------------------------------------------


def _damage_truncate(step_dir):
    victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)


def _other_shape(abstract):
    w = abstract["params"]["w"]
    abstract["params"]["w"] = jax.ShapeDtypeStruct((64, 32), w.dtype, sharding=w.sharding)
    return abstract


def _other_dtype(abstract):
    w = abstract["params"]["w"]
    abstract["params"]["w"] = jax.ShapeDtypeStruct(w.shape, jnp.bfloat16, sharding=w.sharding)
    return abstract


@pytest.mark.parametrize(
    "damage, change, cause",
    [
        (_damage_truncate, None, "its array data is corrupt or truncated"),
        (lambda d: os.remove(d / "state" / "_METADATA"), None, "its metadata file .*_METADATA is missing"),
        (lambda d: shutil.rmtree(d / "data"), None, "its data folder .* is missing"),
        (lambda d: (d / "data" / "metadata").write_text("{trunc"), None, "its data file .* is unreadable"),
        (None, _other_shape, r"params/w is float32\[64,64\] on disk but float32\[64,32\] in this run"),
        (None, _other_dtype, r"params/w is float32\[64,64\] on disk but bfloat16\[64,64\] in this run"),
        (  # saved before checksums: orbax's own check, then the same cause
            lambda d: shutil.rmtree(d / "checksums"),
            _other_shape,
            r"its state does not fit this run's \(other tree structure or shapes\)",
        ),
    ],
)
def test_each_cause_gets_one_short_message_and_the_details_go_to_a_log(saved, damage, change, cause):
    directory, state = saved
    if damage is not None:
        damage(directory / "2")
    abstract = _abstract(state)
    if change is not None:
        abstract = change(abstract)
    with pytest.raises(CheckpointError) as caught:
        Checkpointer(str(directory), keep=3).restore(2, abstract)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600, message  # was 60 lines of TensorStore spec
    assert message.startswith(f"checkpoint step 2 in {directory} could not be restored: ")
    assert re.search(cause, message), message
    assert ("config changed" in message) == (change is not None)  # a damaged step is not a config change
    log = os.path.join(str(directory), RESTORE_LOG)
    assert message.endswith(f"Full error: {log}")
    assert "step 2: " in pathlib.Path(log).read_text()  # the headline, then the full error
