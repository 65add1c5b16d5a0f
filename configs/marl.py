"""MARL presets: `python experiments/train_marl.py --config=configs/marl.py:<preset> --workdir=DIR`.

smoke                IPPO on simple_spread_v3, 1 seed, under a minute on a 2-core CPU (tests and demos)
quick                IPPO on simple_spread_v3, 3 seeds: train + eval in 1-1.5 min on 2 CPU cores (README)
ippo_spread          IPPO-FF on simple_spread_v3, 3 seeds x 10M env steps (benchmarks/marl)
ippo_spread_jaxmarl  JaxMARL 0.2.0's IPPO-FF MPE config exactly (like-for-like with its baseline)
ippo_spread_rnn      recurrent IPPO (GRU) on simple_spread_v3
mappo_spread         MAPPO (centralised critic on the global state) on simple_spread_v3
ippo_tag             IPPO on simple_tag_v3 (3 adversaries, 1 good agent), shared parameters + agent id
ippo_reference       IPPO on simple_reference_v3 (speak and move), shared parameters + agent id
ippo_overcooked      IPPO on Overcooked cramped_room, JaxMARL's ippo_ff_overcooked settings (shaping 1 -> 0)
ippo_hanabi          recurrent IPPO (GRU) on 2-player Hanabi, illegal moves masked
pqn_iql_spread       independent Q-learning, PQN style (no replay, no target net, Q(lambda)), simple_spread_v3
pqn_vdn_spread       VDN (sum of agents' Q regressed on the team return), PQN style, on simple_spread_v3
pqn_qmix_spread      QMIX (monotonic mixer from the global state), PQN style, on simple_spread_v3
pqn_vdn_overcooked   VDN, PQN style, on Overcooked cramped_room (ippo_overcooked's env, shaping and budget)

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


def pqn_iql_spread(c):
    """PQN (Gallici et al. 2024) with independent per-agent targets: 64 envs x 25 steps per update, 4
    epochs x 4 minibatches, lr 5e-3 annealed, Q(lambda=0.9) targets with gamma 0.9, epsilon 1 -> 0.05 over
    the first half of the updates, a LayerNorm Q-network with agent ids; 1M env steps per seed
    (benchmarks/marl/value). gamma 0.99 (the time limit then bootstraps an almost 100-step horizon)
    learned more slowly: -19.6 greedy at 1M steps against -17.8."""
    c.env.num_envs = 64
    c.network.update(activation="relu", agent_id=True)
    c.algo.update(
        name="pqn_iql",
        num_steps=25,
        update_epochs=4,
        num_minibatches=4,
        lr=5e-3,
        gamma=0.9,
        gae_lambda=0.9,
        eps_decay=0.5,
    )
    c.train.update(total_env_steps=1_000_000, num_seeds=3, updates_per_call=25, checkpoint_every=125)


def pqn_vdn_spread(c):
    """pqn_iql_spread's settings with VDN's team target (sum of the agents' rewards)."""
    pqn_iql_spread(c)
    c.algo.name = "pqn_vdn"


def pqn_qmix_spread(c):
    """pqn_iql_spread's settings with QMIX's mixer (hypernetworks on the LayerNormed global state)."""
    pqn_iql_spread(c)
    c.algo.name = "pqn_qmix"


def pqn_vdn_overcooked(c):
    """VDN, PQN style, on Overcooked cramped_room with ippo_overcooked's env, annealed shaped reward and
    budget (5M env steps): 64 envs x 32 steps, 4 epochs x 4 minibatches, lr 5e-4 annealed, gamma 0.99 (a
    soup is many steps away), Q(lambda=0.9), epsilon 1 -> 0.05 over the first 20% of updates, width 128.
    3 seeds reached 229.2 +- 4.7 sparse return (11.5 soups per episode; above 200 from 1.5M steps)
    (benchmarks/marl/overcooked)."""
    overcooked_shaping(c)
    c.env.num_envs = 64
    c.network.update(activation="relu", agent_id=True, hidden=128)
    c.algo.update(
        name="pqn_vdn",
        num_steps=32,
        update_epochs=4,
        num_minibatches=4,
        lr=5e-4,
        gamma=0.99,
        gae_lambda=0.9,
        eps_decay=0.2,
    )
    c.train.update(total_env_steps=5_000_000, num_seeds=3, updates_per_call=61, checkpoint_every=610)


def overcooked_shaping(c):
    """Overcooked cramped_room, 400-step episodes, the env's own reward sparse (soups x 20 per agent, so
    the logged return is comparable with JaxMARL's) and the shaped reward (onion in pot 3, dish pickup 3,
    soup pickup 5) added for the learner only, annealed 1 -> 0 over the first 2.5M env steps as JaxMARL's
    ippo_ff_overcooked does (algo.reward_shaping)."""
    c.env.id = "overcooked"
    c.env.kwargs = {"layout": "cramped_room", "max_steps": 400, "shaped_reward_coef": 0.0}
    c.algo.reward_shaping.update(
        info_key="shaped_reward_by_agent", start_coef=1.0, end_coef=0.0, anneal_env_steps=2_500_000
    )


def ippo_overcooked(c):
    """IPPO-FF on Overcooked cramped_room (overcooked-ai 1.1.0 dynamics) with JaxMARL's ippo_ff_overcooked
    settings: 16 envs x 128 steps, 4 epochs x 4 minibatches, lr 2.5e-4 annealed, tanh 2 x 64, 5M env steps,
    shaped reward annealed 1 -> 0 over 2.5M steps (overcooked_shaping). episode_return is the sparse
    return: 20 per soup delivered. 3 seeds reached 239.4 +- 0.3 (12.0 soups per episode; above 200 from
    1.4M steps) on a 2-core CPU in 44 min (benchmarks/marl/overcooked)."""
    overcooked_shaping(c)
    c.env.num_envs = 16
    c.algo.update(num_steps=128, update_epochs=4, num_minibatches=4, lr=2.5e-4)
    c.train.update(total_env_steps=5_000_000, num_seeds=3, updates_per_call=61, checkpoint_every=610)


def ippo_hanabi(c):
    """Recurrent IPPO (GRU) on 2-player Hanabi (hanabi-learning-environment's Hanabi-Full rules), illegal
    moves masked out of sampling and loss (env.legal_actions). JaxMARL's ippo_rnn_hanabi settings (128
    steps, 4 epochs x 4 minibatches, lr 5e-4 annealed, entropy 0.01, GRU 128) at a quarter of its batch
    (256 envs). Every player gets the team reward, so episode_return is the game's score (0 to 25). One
    seed for 3M of the 50M env steps (the CPU budget) reached a score of 3.6, flat from 1.5M steps
    (benchmarks/marl/hanabi): a curve of an early run, not a trained agent."""
    c.env.update(id="hanabi", num_envs=256)
    c.env.kwargs = {"num_players": 2}
    c.network.update(kind="rnn", hidden=128, activation="relu")
    c.algo.update(num_steps=128, update_epochs=4, num_minibatches=4, lr=5e-4, ent_coef=0.01)
    c.train.update(total_env_steps=50_000_000, num_seeds=3, updates_per_call=10, checkpoint_every=100)


PRESETS = {
    "smoke": smoke,
    "quick": quick,
    "ippo_spread": ippo_spread,
    "ippo_spread_jaxmarl": ippo_spread_jaxmarl,
    "ippo_spread_rnn": ippo_spread_rnn,
    "mappo_spread": mappo_spread,
    "ippo_tag": ippo_tag,
    "ippo_reference": ippo_reference,
    "pqn_iql_spread": pqn_iql_spread,
    "pqn_vdn_spread": pqn_vdn_spread,
    "pqn_qmix_spread": pqn_qmix_spread,
    "pqn_vdn_overcooked": pqn_vdn_overcooked,
    "ippo_overcooked": ippo_overcooked,
    "ippo_hanabi": ippo_hanabi,
}


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r} in configs/marl.py; choose one of {sorted(PRESETS)}.")
    c = base()
    PRESETS[arg](c)
    c.lock()
    return c
