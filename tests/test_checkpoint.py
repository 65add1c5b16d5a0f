"""Checkpointer round trips, including leaves orbax cannot store itself."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.train.checkpoint import Checkpointer


def test_zero_size_leaves_round_trip(tmp_path):
    state = {
        "goals": jnp.zeros((4, 3, 0)),
        "params": {"w": jnp.arange(6.0).reshape(2, 3)},
        "step": jnp.int32(7),
    }
    checkpointer = Checkpointer(str(tmp_path), keep=2)
    checkpointer.save(3, state, {"position": 11})
    checkpointer.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, data = checkpointer.restore(3, abstract)
    checkpointer.close()
    assert data == {"position": 11}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
