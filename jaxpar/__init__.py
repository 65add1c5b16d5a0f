"""jaxpar: one model definition, every parallelism, measured.

The package is layered; a module imports only from layers below its own (and from its own package).
tests/test_layers.py walks every import and fails on one that points up or sideways.
"""

# Lowest first. Packages on one line are independent of each other.
LAYERS = (
    ("machine", "kernels", "interop"),  # know nothing of jaxpar (interop: Hugging Face files <-> plain dicts)
    ("data",),  # tokenizers and prepared token corpora; no jax, so tokenizing worker processes start fast
    ("parallel",),  # mesh, logical rules, collectives, schedule executor: no model, no config format, no loop
    ("config",),  # typed run configs and their checks
    ("envs",),  # multi-agent environments: no model, no loop
    ("models",),  # Flax NNX models, logical axis names only
    ("train",),  # state, steps, the LM training loop, checkpoints, data, metrics
    ("infer", "rl", "plan"),  # generation and serving (reads checkpoints); IPPO / MAPPO; memory planner
    ("launch",),  # multi-process, SLURM, TPU VM, sweeps
    ("bench",),  # benchmark code behind experiments/bench_*.py
)
