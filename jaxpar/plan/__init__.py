"""Will it fit, and with which mesh? An analytic planner: per-device memory (jaxpar.train.fit's model),
collective bytes (jaxpar.train.costs' formulas), FLOPs and a roofline step time for every mesh, remat
policy, microbatching / pipeline schedule and offload choice, ranked (scripts/plan.py)."""
