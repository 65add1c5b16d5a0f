"""Multi-agent RL on the shared runtime: pieces written once, and IPPO / MAPPO and the PQN-style
Q-learners built from them.

    config.py      typed MARL run config (env, algo, network, mesh, train, eval) and its checks
    batching.py    agent ids, the global state, action masks, env-major sample layout, minibatch splits
    networks.py    NNX actor-critic towers (MLP or GRU core) with logical axis names on every weight
    rollout.py     rollout collection under lax.scan, episode statistics
    gae.py         GAE with terminated vs truncated (bootstrap from the final observation's value)
    losses.py      PPO clipped objective, clipped value loss, entropy
    algorithms.py  IPPO and MAPPO: what the actor and the critic see
    ppo.py         the learner: whole run jitted, seeds vmapped, env batch and weights sharded by the rules
    pqn.py         value-based learners on PPO's runtime: PQN-style IQL / VDN / QMIX (Q(lambda), no replay)
    loop.py        host loop (metrics, progress, orbax checkpoints, resume) and the evaluation mode
    plots.py, render.py   learning curves, episode animations

Entry points: experiments/train_marl.py (train / eval), experiments/bench_marl.py; presets in configs/marl.py.
"""
