"""Orbax checkpoints: async, keep-last-N, atomic (orbax writes to a temporary folder and renames it on
commit). A checkpoint holds the train state and the data iterator's position, so a resumed run sees
exactly the batches an uninterrupted one would. Restoring takes the target shardings from an abstract
state, so a checkpoint saved on one mesh restores onto any other."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored; nothing on disk has been changed."""


def _without_empty(tree):
    """Zero-size arrays as None: orbax refuses them, and they hold nothing to save (e.g. an MPE scenario
    without random goals keeps goal positions of shape [S, E, 0])."""
    return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


class Checkpointer:
    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        registry = ocp.handlers.create_default_handler_registry(
            state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler()
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        """Returns once device arrays are copied to host; the write finishes in the background."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_without_empty(state)), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state):
        """(state placed with abstract_state's shardings, data iterator state)."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_without_empty(abstract_state)),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as error:  # orbax raises many types; all mean the same to the user
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} could not be restored "
                f"({type(error).__name__}: {error}). It was left untouched. If the model config changed "
                "since it was written, run with the config it was saved with (config.json in the workdir) or "
                "use a new --workdir; if the step is corrupt, move "
                f"{os.path.join(self.directory, str(step))} aside to resume from an earlier step."
            ) from error
        state = jax.tree.map(
            lambda want, got: (
                jax.device_put(np.zeros(want.shape, want.dtype), want.sharding) if got is None else got
            ),
            abstract_state,
            restored.state,
        )
        return state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()
