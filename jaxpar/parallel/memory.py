"""Memory kinds inside jitted code: moving host-resident (pinned_host) arrays onto the device."""

import jax


def to_device(tree):
    """`tree` with every leaf that lives in host memory copied into device memory (same sharding); leaves
    already on the device are returned as they are, so code calling this traces to the same program when
    nothing is offloaded."""

    def one(x):
        if jax.typeof(x).memory_space == jax.memory.Space.Host:
            return jax.device_put(x, jax.memory.Space.Device)
        return x

    return jax.tree.map(one, tree)
