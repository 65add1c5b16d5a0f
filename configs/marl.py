"""MARL presets: `python experiments/train_marl.py --config=configs/marl.py:<preset> --workdir=DIR`.

smoke                IPPO on simple_spread_v3, 1 seed, under a minute on a 2-core CPU (tests and demos)
quick                IPPO on simple_spread_v3, 3 seeds: train + eval in 1-1.5 min on 2 CPU cores (README)
ippo_spread          IPPO-FF on simple_spread_v3, 3 seeds x 10M env steps (benchmarks/marl)
ippo_spread_jaxmarl  JaxMARL 0.2.0's IPPO-FF MPE config exactly (like-for-like with its baseline)
ippo_spread_rnn      recurrent IPPO (GRU) on simple_spread_v3
mappo_spread         MAPPO (centralised critic on the global state) on simple_spread_v3
ippo_tag             IPPO on simple_tag_v3 (3 adversaries, 1 good agent), shared parameters + agent id
ippo_reference       IPPO on simple_reference_v3 (speak and move), shared parameters + agent id

Budgets are per seed (train.total_env_steps); override any key, e.g. --config.train.total_env_steps=2000000.
"""

import ml_collections

from jaxpar.config import config_dict
from jaxpar.rl.config import MARLRunConfig


def base() -> ml_collections.ConfigDict:
    """The defaults of jaxpar.rl.config's dataclasses, with 32 evaluation episodes per seed (evaluation runs
    them all in one program; 4 left the mean a few points off the training curve)."""
    c = config_dict(MARLRunConfig())
    c.eval.episodes = 32
    return c


def smoke(c):
    """About 100k env steps: learns clearly beyond random (about -26 -> -21 per agent) in seconds."""
    c.env.num_envs = 64
    c.algo.update(num_steps=25, update_epochs=2, num_minibatches=2, lr=2e-3, anneal_lr=False)
    c.train.update(total_env_steps=64 * 25 * 60, num_seeds=1, updates_per_call=20, checkpoint_every=20)
    c.eval.episodes = 1


def quick(c):
    """The README's first command: smoke's fast settings on 3 seeds for 4x the updates, so that the
    learning curve and the evaluation show a mean +- std over seeds."""
    smoke(c)
    c.train.update(total_env_steps=64 * 25 * 240, num_seeds=3, updates_per_call=40, checkpoint_every=120)
    c.eval.episodes = 32


def ippo_spread(c):
    """The wall-clock benchmark: JaxMARL's batch (16 envs x 128 steps) and number of gradient steps per
    update (16), in 2 epochs of 8 minibatches (half the gradient FLOPs per env step) at 2x its learning
    rate (5e-4, annealed). lr 1e-3 learned faster but collapsed 2 of 3 seeds after 3M steps."""
    c.algo.update(num_steps=128, update_epochs=2, num_minibatches=8, lr=5e-4)
    c.train.update(
        total_env_steps=10_000_000, num_seeds=3, updates_per_call=61, log_every=1, checkpoint_every=610
    )


def ippo_spread_jaxmarl(c):
    """JaxMARL's ippo_ff_mpe.yaml: 16 envs x 128 steps, 4 epochs x 4 minibatches, lr 2.5e-4 annealed,
    and (like JaxMARL) a time limit treated as a termination."""
    c.algo.update(num_steps=128, update_epochs=4, num_minibatches=4, lr=2.5e-4, bootstrap_truncated=False)
    c.train.update(total_env_steps=10_000_000, num_seeds=3, updates_per_call=61, checkpoint_every=610)


def ippo_spread_rnn(c):
    """Recurrent IPPO: minibatches are whole env sequences (8 of the 32 envs each)."""
    c.env.num_envs = 32
    c.network.update(kind="rnn", hidden=64, activation="relu")
    c.algo.update(num_steps=128, update_epochs=2, num_minibatches=4, lr=5e-4)
    c.train.update(total_env_steps=2_000_000, num_seeds=3, updates_per_call=61, checkpoint_every=305)


def mappo_spread(c):
    c.algo.update(name="mappo", num_steps=128, update_epochs=2, num_minibatches=8, lr=5e-4)
    c.train.update(total_env_steps=2_000_000, num_seeds=3, updates_per_call=61, checkpoint_every=305)


def ippo_tag(c):
    c.env.update(id="simple_tag_v3")
    c.network.agent_id = True
    c.algo.update(num_steps=128, update_epochs=2, num_minibatches=8, lr=5e-4)
    c.train.update(total_env_steps=2_000_000, num_seeds=3, updates_per_call=61, checkpoint_every=305)


def ippo_reference(c):
    c.env.update(id="simple_reference_v3")
    c.network.agent_id = True
    c.algo.update(num_steps=128, update_epochs=2, num_minibatches=8, lr=5e-4)
    c.train.update(total_env_steps=2_000_000, num_seeds=3, updates_per_call=61, checkpoint_every=305)


PRESETS = {
    "smoke": smoke,
    "quick": quick,
    "ippo_spread": ippo_spread,
    "ippo_spread_jaxmarl": ippo_spread_jaxmarl,
    "ippo_spread_rnn": ippo_spread_rnn,
    "mappo_spread": mappo_spread,
    "ippo_tag": ippo_tag,
    "ippo_reference": ippo_reference,
}


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r} in configs/marl.py; choose one of {sorted(PRESETS)}.")
    c = base()
    PRESETS[arg](c)
    c.lock()
    return c
