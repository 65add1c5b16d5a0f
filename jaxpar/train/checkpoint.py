"""Orbax checkpoints: async, keep-last-N, atomic (orbax writes to a temporary folder and renames it on
commit). A checkpoint holds the train state and the data iterator's position, so a resumed run sees
exactly the batches an uninterrupted one would. Restoring takes the target shardings from an abstract
state, so a checkpoint saved on one mesh restores onto any other.

Every saved leaf and the data position carry a checksum (a third item, `checksums`, JSON) that restore
verifies: a checkpoint restores bitwise or not at all. A step that fails is named, never deleted; with
`on_corrupt="fallback"` the newest intact earlier step is restored instead and the damaged one is moved
to `<directory>/corrupt/`. Each restore failure is one short message; the full error goes to
`<directory>/restore_error.log`."""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

CHECKSUM_FORMAT = 1
RESTORE_LOG = "restore_error.log"
SAVE_LOG = "save_error.log"
CORRUPT_DIR = "corrupt"  # where on_corrupt="fallback" moves a damaged step (a name orbax never lists)

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored (or written); nothing saved has been deleted."""


class CorruptCheckpointError(CheckpointError):
    """A step is damaged: unreadable, incomplete, or its contents fail their checksums. An earlier step
    may still be intact (on_corrupt="fallback" resumes from it)."""


def _without_empty(tree):
    """Zero-size arrays as None: orbax refuses them, and they hold nothing to save (e.g. an MPE scenario
    without random goals keeps goal positions of shape [S, E, 0])."""
    return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


# --- checksums -----------------------------------------------------------------------------------------


def _mix(v):
    """A bijection of uint32 (xor-shifts and odd multipliers are each invertible) that spreads every
    input bit over the whole word."""
    v = v ^ (v >> 16)
    v = v * jnp.uint32(0x7FEB352D)
    v = v ^ (v >> 15)
    v = v * jnp.uint32(0x846CA68B)
    return v ^ (v >> 16)


def _words(x) -> jax.Array:
    """x's raw bits as uint32, one word per element (8-byte dtypes: two, on a new trailing axis)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits < 8:  # int4 etc.: by value
        return x.astype(jnp.int32).astype(jnp.uint32)
    narrow = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize)
    if narrow is not None:
        return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def fingerprint(x) -> jax.Array:
    """uint32[2]: two position-weighted sums of x's raw bits, computed where x lives (any sharding).

    Word i (in row-major order of the global array) is weighted by an odd multiplier: 2i + 1 in the
    first sum, _mix(i) | 1 in the second (which sums _mix(word)). Sums are uint32 with wrap-around, i.e.
    modulo 2**32: integer addition is associative and commutative, so the result is the same bits
    whatever the mesh, the sharding or the reduction order. Why every single-element change is caught:
    changing word i from a to b != a moves the first sum by (b - a) * (2i + 1) mod 2**32; b - a is not 0
    mod 2**32 (both are 32-bit words) and an odd number is invertible mod 2**32, so the product is not 0.
    The same holds for the second sum because _mix is a bijection. The position weights also make swapped
    or shifted elements show, which a plain sum would not (all but a vanishing fraction of them)."""
    w = _words(x)
    position = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
        position = position + iota * jnp.uint32(stride % 2**32)
        stride *= w.shape[axis]
    first = jnp.sum(w * (position * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    second = jnp.sum(_mix(w) * (_mix(position) | jnp.uint32(1)), dtype=jnp.uint32)
    return jnp.stack([first, second])


# One program for many leaves; jit caches it per tree structure, shapes and shardings (one per run).
_fingerprints = jax.jit(lambda leaves: [fingerprint(x) for x in leaves])


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _describe_leaf(shape, dtype) -> str:
    return f"{dtype}[{','.join(map(str, shape))}]"


def leaf_checksums(tree) -> dict[str, dict]:
    """{leaf name: {"shape", "dtype", "sum"}} of every non-empty leaf, fingerprinted on device: one
    jitted program per set of devices the leaves live on."""
    groups: dict = {}  # leaves on different device sets cannot share one program
    for path, x in jax.tree_util.tree_flatten_with_path(_without_empty(tree))[0]:
        devices = frozenset(x.sharding.device_set) if isinstance(x, jax.Array) else None
        groups.setdefault(devices, []).append((path, x))
    out = {}
    for items in groups.values():
        sums = _fingerprints([x for _, x in items])
        for (path, x), s in zip(items, sums):
            s = np.asarray(s)  # replicated: readable on every process
            out[_leaf_name(path)] = {
                "shape": list(x.shape),
                "dtype": str(x.dtype),
                "sum": f"{int(s[0]):08x}{int(s[1]):08x}",
            }
    return dict(sorted(out.items()))


def data_checksum(data_state) -> str:
    """sha256 of the data position as canonical JSON (what orbax writes and reads back)."""
    return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


# --- the checkpointer --------------------------------------------------------------------------------


class Checkpointer:
    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        registry = ocp.handlers.create_default_handler_registry(
            state=ocp.StandardCheckpointHandler(),
            data=ocp.JsonCheckpointHandler(),
            checksums=ocp.JsonCheckpointHandler(),
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        self._writing: int | None = None  # the step whose async write may still be running

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        """Returns once device arrays are copied to host; the write finishes in the background. A failed
        write (e.g. a full disk) raises CheckpointError here, at the next save, or at wait/close."""
        self.wait()  # orbax waits for the previous write anyway; this names its step if it failed
        state = _without_empty(state)
        checksums = {
            "format": CHECKSUM_FORMAT,
            "leaves": leaf_checksums(state),
            "data": data_checksum(data_state),
        }
        self._writing = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    checksums=ocp.args.JsonSave(checksums),
                ),
                force=True,
            )
        except Exception as error:  # orbax and tensorstore raise many types for one cause
            self._writing = None
            raise self._save_error(step, error) from error

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # as in save
            step, self._writing = self._writing, None
            if step is None:
                return  # orbax raising again a failure already raised as a CheckpointError
            raise self._save_error(step, error) from error
        self._writing = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def _save_error(self, step: int | None, error: BaseException) -> CheckpointError:
        self.manager.reload()
        intact = self.manager.all_steps()
        full = _disk_full(error)
        cause = "the disk is full (No space left on device)" if full else _first_line(error)
        where = self._write_log(SAVE_LOG, f"saving step {step}: {cause}", error)
        earlier = (
            f"Earlier steps are intact (newest: {max(intact)}); rerun after fixing this to resume from it."
            if intact
            else "No earlier step was saved."
        )
        fix = "Free space or point --workdir at a larger disk. " if full else ""
        return CheckpointError(
            f"could not write checkpoint step {step} to {self.directory}: {cause}. {fix}{earlier} {where}"
        )

    # --- restore ---------------------------------------------------------------------------------------

    def restore(self, step: int, abstract_state, apply_data=None):
        """(state placed with abstract_state's shardings, data iterator state), both checked against the
        checksums saved with them. `apply_data(data_state)` (e.g. a grain iterator's set_state) runs
        inside the error handling. Raises CorruptCheckpointError for a damaged step, CheckpointError
        when the step does not fit this run (config changed); nothing on disk is changed."""
        step_dir = os.path.join(self.directory, str(step))
        for item in ("state", "data"):
            if not os.path.isdir(os.path.join(step_dir, item)):
                self._fail(step, f"its {item} folder {os.path.join(step_dir, item)} is missing", corrupt=True)
        metadata = os.path.join(step_dir, "state", "_METADATA")
        if not os.path.isfile(metadata):
            self._fail(step, f"its metadata file {metadata} is missing", corrupt=True)

        checksums = None
        if os.path.isdir(os.path.join(step_dir, "checksums")):
            checksums = self._read_json(step, step_dir, "checksums")
            self._check_structure(step, checksums, abstract_state)
        elif jax.process_index() == 0:
            log.warning(
                "checkpoint step %d in %s has no checksums (saved by an older version); restoring it "
                "unverified.",
                step,
                self.directory,
            )

        try:
            state = _restore_item(os.path.join(step_dir, "state"), _without_empty(abstract_state))
        except Exception as error:  # classified below; the full error goes to the log
            _quiet_failed_reads()
            if _is_mismatch(error):
                cause = "its state does not fit this run's (other tree structure or shapes)"
                self._fail(step, cause, error, advice=_CONFIG_ADVICE)
            cause = "its array data is corrupt or truncated (a file could not be read)"
            self._fail(step, cause, error, corrupt=True)
        data = self._read_json(step, step_dir, "data")

        if checksums is not None:
            self._verify(step, step_dir, checksums, state, data)
        if apply_data is not None:
            try:
                apply_data(data)
            except Exception as error:  # whatever it raises, the position does not fit
                self._fail(
                    step,
                    f"the data position in {_json_file(step_dir, 'data')} does not fit this run's data "
                    f"pipeline ({type(error).__name__}: {_first_line(error)})",
                    error,
                    advice="If the data config changed, run with the one it was saved with (config.json in "
                    "the workdir) or use a new --workdir.",
                )
        state = jax.tree.map(
            lambda want, got: (
                jax.device_put(np.zeros(want.shape, want.dtype), want.sharding) if got is None else got
            ),
            abstract_state,
            state,
        )
        return state, data

    def restore_latest(self, abstract_state, on_corrupt: str = "stop", apply_data=None):
        """(step, state, data state) of the newest checkpoint, or None when there is none. A corrupt
        newest step stops the run (on_corrupt="stop") or, with on_corrupt="fallback", is moved to
        `<directory>/corrupt/` (never deleted) and the newest intact earlier step is restored, with a
        warning naming both steps."""
        if on_corrupt not in ("stop", "fallback"):
            raise ValueError(f"on_corrupt={on_corrupt!r}; choose 'stop' or 'fallback'.")
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        skipped: list[tuple[int, CorruptCheckpointError]] = []
        for step in steps:
            try:
                state, data = self.restore(step, abstract_state, apply_data)
            except CorruptCheckpointError as error:
                if on_corrupt != "fallback":
                    raise
                skipped.append((step, error))
                continue
            if skipped:
                self._set_aside(skipped, step)
            return step, state, data
        raise CheckpointError(
            f"every checkpoint in {self.directory} is corrupt (steps {', '.join(map(str, steps))}); nothing "
            f"was changed on disk. The errors are in {os.path.join(self.directory, RESTORE_LOG)}; start "
            "afresh with a new --workdir."
        )

    def _set_aside(self, skipped, good: int) -> None:
        moved = []
        for step, _ in skipped:
            dest = os.path.join(self.directory, CORRUPT_DIR, str(step))
            n = 1
            while os.path.exists(dest):
                n += 1
                dest = os.path.join(self.directory, CORRUPT_DIR, f"{step}-{n}")
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.rename(os.path.join(self.directory, str(step)), dest)
            moved.append(dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxpar_checkpoint_set_aside")
        self.manager.reload()
        if jax.process_index() == 0:
            bad = ", ".join(str(step) for step, _ in skipped)
            log.warning(
                "checkpoint %s %s corrupt; resuming from step %d, the newest intact step "
                "(on_corrupt=fallback). Moved to %s, not deleted; details in %s.",
                f"step {bad}" if len(skipped) == 1 else f"steps {bad}",
                "is" if len(skipped) == 1 else "are",
                good,
                ", ".join(moved),
                os.path.join(self.directory, RESTORE_LOG),
            )

    def _read_json(self, step: int, step_dir: str, item: str):
        try:
            return _restore_item(os.path.join(step_dir, item), None, json_item=True)
        except Exception as error:  # missing or garbled: the step is damaged
            self._fail(
                step, f"its {item} file {_json_file(step_dir, item)} is unreadable", error, corrupt=True
            )

    def _check_structure(self, step: int, checksums: dict, abstract_state) -> None:
        """Shapes and dtypes on disk against the run's: a mismatch means the config changed (orbax would
        cast a dtype silently and fail on a shape with storage internals)."""
        saved = checksums.get("leaves", {})
        wanted = {
            _leaf_name(path): (tuple(x.shape), str(x.dtype))
            for path, x in jax.tree_util.tree_flatten_with_path(_without_empty(abstract_state))[0]
        }
        missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
        if missing or extra:
            parts = [f"this run has leaves it lacks ({_some(missing)})"] if missing else []
            parts += [f"it holds leaves this run lacks ({_some(extra)})"] if extra else []
            self._fail(step, f"its state does not fit this run's: {'; '.join(parts)}", advice=_CONFIG_ADVICE)
        for name, (shape, dtype) in wanted.items():
            if (tuple(saved[name]["shape"]), saved[name]["dtype"]) != (shape, dtype):
                self._fail(
                    step,
                    f"its state does not fit this run's: {name} is "
                    f"{_describe_leaf(saved[name]['shape'], saved[name]['dtype'])} on disk but "
                    f"{_describe_leaf(shape, dtype)} in this run",
                    advice=_CONFIG_ADVICE,
                )

    def _verify(self, step: int, step_dir: str, checksums: dict, state, data) -> None:
        saved = checksums["leaves"]
        got = leaf_checksums(state)
        bad = [name for name in saved if got.get(name, {}).get("sum") != saved[name]["sum"]]
        details = [f"{name}: saved {saved[name]['sum']}, read {got.get(name, {}).get('sum')}" for name in bad]
        if data_checksum(data) != checksums.get("data"):
            bad.append(f"the data position ({_json_file(step_dir, 'data')})")
            details.append(f"data position: saved {checksums.get('data')}, read {data_checksum(data)}")
        if bad:
            self._fail(
                step,
                f"{_some(bad)} {'does' if len(bad) == 1 else 'do'} not match the checksum saved with it "
                f"(the files under {step_dir} changed after they were written)",
                details="\n".join(details),
                corrupt=True,
            )

    def _fail(self, step, cause, error=None, corrupt=False, advice=None, details=None):
        """Raises the one-paragraph error of a failed restore; the full error goes to the log file."""
        where = self._write_log(RESTORE_LOG, f"step {step}: {cause}", error, details)
        if advice is None and corrupt:
            advice = (
                "Resume from the newest intact earlier step with --config.checkpoint.on_corrupt=fallback "
                f"or move {os.path.join(self.directory, str(step))} aside."
            )
        kind = CorruptCheckpointError if corrupt else CheckpointError
        head = f"checkpoint step {step} in {self.directory} could not be restored: {cause}."
        raise kind(
            " ".join(part for part in (head, "It was left untouched.", advice, where) if part)
        ) from error

    def _write_log(self, name: str, headline: str, error=None, details=None) -> str:
        """Appends the full story to `<directory>/<name>`; returns a sentence naming that file."""
        path = os.path.join(self.directory, name)
        if jax.process_index() != 0:
            path = os.path.join(self.directory, f"{os.path.splitext(name)[0]}.{jax.process_index()}.log")
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        text = f"=== {stamp} {headline}\n"
        if details:
            text += details + "\n"
        if error is not None:
            text += "".join(traceback.format_exception(error))
        try:
            with open(path, "a") as f:
                f.write(text + "\n")
        except OSError as log_error:
            return f"(The full error could not be written to {path}: {log_error.strerror}.)"
        return f"Full error: {path}"


_CONFIG_ADVICE = (
    "The model or optimizer config changed since it was saved: run with the config it was saved with "
    "(config.json in the workdir) or use a new --workdir."
)
# Orbax's words when the target tree or shapes differ from the saved ones (a config change, not damage).
_MISMATCH_MARKERS = ("tree structures do not match", "pytree structure error", "is not compatible with the")


class _FailedReadNoise(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for orbax's reads of a damaged step: when one
    read fails, the others' errors (the same storage details, dozens of lines each) are printed at garbage
    collection, long after the one-line error was raised. The first error is in restore_error.log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Task exception was never retrieved" in message and "orbax" in message)


def _quiet_failed_reads() -> None:
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _FailedReadNoise) for f in asyncio_log.filters):
        asyncio_log.addFilter(_FailedReadNoise())


def _restore_item(path: str, target, json_item: bool = False):
    if json_item:
        handler, args = ocp.JsonCheckpointHandler(), ocp.args.JsonRestore()
    else:
        handler, args = ocp.StandardCheckpointHandler(), ocp.args.StandardRestore(target)
    with ocp.Checkpointer(handler) as checkpointer:  # a fresh reader per attempt: no state survives one
        return checkpointer.restore(path, args=args)


def _json_file(step_dir: str, item: str) -> str:
    return os.path.join(step_dir, item, "metadata")  # JsonCheckpointHandler's default file name


def _is_mismatch(error: BaseException) -> bool:
    return any(marker in str(e) for e in _chain(error) for marker in _MISMATCH_MARKERS)


def _disk_full(error: BaseException) -> bool:
    return any(
        getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)
        for e in _chain(error)
    )


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
