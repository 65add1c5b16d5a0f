"""Typed, frozen MARL run configuration, built from a ConfigDict at one boundary (as `jaxpar.config`).

The sections reuse `jaxpar.config`'s strict builder (unknown keys and wrong types fail with one message)
and its `MeshConfig`, so an RL run is placed on the same mesh description as a language model. Checks
that need the device count or the environment (batch shards, minibatch sizes, action spaces) live in
`validate_run`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence

import ml_collections

from jaxpar.config import (
    COUNT,
    NON_NEGATIVE,
    Bound,
    CheckpointConfig,
    MeshConfig,
    batch_split,
    build_run,
    check_ranges,
    one_of,
    require,
)

# The checkout holding configs/ and experiments/ (jaxpar is installed editable from it, scripts/setup.sh).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ALGORITHMS = ("ippo", "mappo", "pqn_iql", "pqn_vdn", "pqn_qmix")
VALUE_BASED = ("pqn_iql", "pqn_vdn", "pqn_qmix")  # learned by jaxpar.rl.pqn; the others by jaxpar.rl.ppo
NETWORKS = ("ff", "rnn")
ACTIVATIONS = ("tanh", "relu")


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """`id` as registered in `jaxpar.envs`; `kwargs` go to `jaxpar.envs.make(id, **kwargs)`."""

    id: str = "simple_spread_v3"
    kwargs: dict = dataclasses.field(default_factory=dict)
    num_envs: int = 16

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {"num_envs": COUNT}

    def __post_init__(self):
        check_ranges(self, "env")


@dataclasses.dataclass(frozen=True)
class RewardShapingConfig:
    """An annealed bonus added to the reward the learner trains on (any environment, PPO and PQN alike):
    reward + coef(t) * info[info_key] per agent, where t counts this seed's env steps of training and coef
    goes linearly from start_coef to end_coef over the first anneal_env_steps (then holds end_coef; 0
    steps: start_coef throughout). The logged episode_return stays the environment's own reward, so a
    shaped run is judged by the task's return (JaxMARL's Overcooked IPPO anneals shaped reward 1 -> 0
    over 2.5M steps this way). info_key "" (the default) turns it off."""

    info_key: str = ""
    start_coef: float = 1.0
    end_coef: float = 0.0
    anneal_env_steps: int = 0

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {
        "start_coef": Bound(means="the bonus' weight at the first env step"),
        "end_coef": Bound(means="the bonus' weight after anneal_env_steps"),
        "anneal_env_steps": Bound(low=0, means="env steps of the linear anneal; 0 = start_coef throughout"),
    }

    def __post_init__(self):
        check_ranges(self, "algo.reward_shaping")


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    """PPO with IPPO's per-agent critic or MAPPO's centralised critic, or a PQN-style Q-learner
    (jaxpar.rl.pqn): independent Q-learning (pqn_iql), VDN (pqn_vdn) or QMIX (pqn_qmix). One update
    collects num_steps x env.num_envs transitions per seed, then runs update_epochs passes of
    num_minibatches. Shared: num_steps, update_epochs, num_minibatches, gamma, gae_lambda (GAE for PPO,
    Q(lambda) returns for PQN), max_grad_norm, lr, anneal_lr, bootstrap_truncated. PPO only: clip_eps,
    ent_coef, vf_coef, normalize_advantages, clip_value. PQN only: the eps_* exploration schedule and
    mixer_embed (QMIX). Both: reward_shaping (an annealed bonus read from the env's info)."""

    name: str = "ippo"
    num_steps: int = 128
    update_epochs: int = 4
    num_minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    lr: float = 2.5e-4
    anneal_lr: bool = True
    normalize_advantages: bool = True
    clip_value: bool = True
    # True: a time limit bootstraps from the value of the final observation (the correct target);
    # False: truncation is treated like termination (JaxMARL's behaviour), for like-for-like comparisons.
    bootstrap_truncated: bool = True
    # PQN: epsilon-greedy exploration, annealed linearly from eps_start to eps_finish over the first
    # eps_decay fraction of the updates (then held); evaluation's "sampled" mode acts with eps_finish.
    eps_start: float = 1.0
    eps_finish: float = 0.05
    eps_decay: float = 0.2
    mixer_embed: int = 32  # QMIX: width of the monotonic mixing network made by the hypernetworks
    reward_shaping: RewardShapingConfig = RewardShapingConfig()  # an annealed bonus from an info key

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {
        "num_steps": COUNT,
        "update_epochs": COUNT,
        "num_minibatches": COUNT,
        "gamma": Bound(low=0, high=1, means="the discount"),
        "gae_lambda": Bound(low=0, high=1, means="the lambda-returns' bias-variance trade-off"),
        "clip_eps": Bound(low=0, low_open=True, means="PPO's ratio clip"),
        "ent_coef": NON_NEGATIVE,
        "vf_coef": NON_NEGATIVE,
        "max_grad_norm": Bound(
            low=0, low_open=True, means="the global gradient norm clipped to; 0 would zero every gradient"
        ),
        "lr": Bound(low=0, low_open=True, means="Adam's learning rate"),
        "eps_start": Bound(low=0, high=1, means="the exploration probability of the first update"),
        "eps_finish": Bound(low=0, high=1, means="the exploration probability after the decay"),
        "eps_decay": Bound(
            low=0, high=1, low_open=True, means="the fraction of the updates over which epsilon anneals"
        ),
        "mixer_embed": COUNT,
    }

    def __post_init__(self):
        one_of("algo.name", self.name, ALGORITHMS)
        check_ranges(self, "algo")
        require(
            self.eps_finish <= self.eps_start,
            f"algo.eps_finish={self.eps_finish} is above algo.eps_start={self.eps_start}; epsilon anneals "
            "downwards: make eps_finish <= eps_start.",
        )


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Actor and critic towers of `layers` hidden layers of width `hidden` ("ff"), or an embedding
    layer, a GRU of width `hidden` and one hidden layer ("rnn"). One set of parameters is shared by
    all agents; `agent_id` appends a one-hot agent index to every input so they can still differ."""

    kind: str = "ff"
    hidden: int = 64
    layers: int = 2
    activation: str = "tanh"
    agent_id: bool = False

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {"hidden": COUNT, "layers": COUNT}

    def __post_init__(self):
        one_of("network.kind", self.kind, NETWORKS)
        one_of("network.activation", self.activation, ACTIVATIONS)
        check_ranges(self, "network")


@dataclasses.dataclass(frozen=True)
class MARLTrainConfig:
    """Budget in env steps per seed (each seed's run sees total_env_steps transitions of env.num_envs
    envs); num_seeds independent runs are vmapped into one program. `updates_per_call` updates run in
    one jitted call between host-side logging and checkpoints; log/checkpoint periods are in updates."""

    total_env_steps: int = 1_000_000
    num_seeds: int = 1
    seed: int = 0
    updates_per_call: int = 10
    log_every: int = 1
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {
        "total_env_steps": COUNT,
        "num_seeds": COUNT,
        "seed": Bound(low=0, high=2**31, high_open=True),
        "updates_per_call": COUNT,
        "log_every": COUNT,
        "checkpoint_every": Bound(low=0, means="0 = only at the end"),
        "keep_checkpoints": COUNT,
    }

    def __post_init__(self):
        check_ranges(self, "train")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation mode: roll out `episodes` episodes of every seed's checkpointed policy, sampling and
    greedy; the animation shows the first episode of seed `seed_index`, greedy or sampled by `greedy`."""

    episodes: int = 1
    greedy: bool = True
    seed_index: int = 0
    fps: int = 10

    RANGES: typing.ClassVar[Mapping[str, Bound]] = {
        "episodes": COUNT,
        "seed_index": Bound(low=0, means="below train.num_seeds"),
        "fps": COUNT,
    }

    def __post_init__(self):
        check_ranges(self, "eval")


@dataclasses.dataclass(frozen=True)
class MARLRunConfig:
    env: EnvConfig = EnvConfig()
    algo: AlgoConfig = AlgoConfig()
    network: NetworkConfig = NetworkConfig()
    mesh: MeshConfig = MeshConfig()
    train: MARLTrainConfig = MARLTrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @property
    def steps_per_update(self) -> int:
        """Env steps of one seed per update."""
        return self.env.num_envs * self.algo.num_steps

    @property
    def num_updates(self) -> int:
        return self.train.total_env_steps // self.steps_per_update


def from_config_dict(config: ml_collections.ConfigDict | dict) -> MARLRunConfig:
    """The one boundary from a (user-edited) ConfigDict to typed, validated MARL configs."""
    run = build_run(MARLRunConfig, config)
    require(
        run.num_updates >= 1,
        f"train.total_env_steps={run.train.total_env_steps} is less than one update of env.num_envs x "
        f"algo.num_steps = {run.steps_per_update} env steps; raise it or shrink the update.",
    )
    return run


def validate_run(run: MARLRunConfig, num_devices: int, env) -> dict[str, int]:
    """Checks that need the device count or the environment. Returns the resolved mesh axis sizes."""
    from jaxpar.envs import spaces

    sizes = run.mesh.resolve(num_devices)
    shards, batch_keys = batch_split(sizes)
    algo, num_envs = run.algo, run.env.num_envs
    require(
        num_envs % shards == 0,
        f"env.num_envs={num_envs} is not divisible by {batch_keys}={shards}; the env "
        f"batch is split evenly over those axes. Use a multiple of {shards}.",
    )
    require(
        isinstance(env.action_space, spaces.Discrete),
        f"env {run.env.id!r} with kwargs {run.env.kwargs} has continuous actions; the PPO heads and "
        "Q-networks here are categorical. Use discrete actions (e.g. env.kwargs.continuous_actions=False).",
    )
    if run.network.kind == "rnn":
        # Recurrent minibatches are whole env sequences.
        require(
            num_envs % algo.num_minibatches == 0 and (num_envs // algo.num_minibatches) % shards == 0,
            f"network.kind='rnn' splits the env.num_envs={num_envs} sequences into "
            f"algo.num_minibatches={algo.num_minibatches} minibatches, each split over {shards} batch "
            f"shards; make num_envs a multiple of num_minibatches*{shards}={algo.num_minibatches * shards}.",
        )
    else:
        samples = num_envs * algo.num_steps
        require(
            samples % (algo.num_minibatches * shards) == 0,
            f"an update's {samples} env steps (num_envs*num_steps, all agents of a step kept together) do "
            f"not split into algo.num_minibatches={algo.num_minibatches} minibatches over {shards} batch "
            f"shards; choose num_minibatches so that {algo.num_minibatches * shards} divides {samples}.",
        )
    require(
        sizes["fsdp"] * sizes["tensor"] == 1 or run.network.hidden % (sizes["fsdp"] * sizes["tensor"]) == 0,
        f"network.hidden={run.network.hidden} is not divisible by mesh.fsdp*mesh.tensor="
        f"{sizes['fsdp'] * sizes['tensor']}; sharded policy weights split the hidden width evenly.",
    )
    check_reward_shaping(run, env)
    weight_shards = sizes["fsdp"] * sizes["tensor"]
    require(
        algo.name != "pqn_qmix" or weight_shards == 1 or algo.mixer_embed % weight_shards == 0,
        f"algo.mixer_embed={algo.mixer_embed} is not divisible by mesh.fsdp*mesh.tensor={weight_shards}; "
        "QMIX's sharded hypernetworks split the mixing width evenly.",
    )
    return sizes


def check_reward_shaping(run: MARLRunConfig, env) -> None:
    """algo.reward_shaping.info_key, when set, names a float array of the env's step info with one value
    per agent (or one for all), found by tracing one step abstractly."""
    import jax
    import jax.numpy as jnp

    key = run.algo.reward_shaping.info_key
    if not key:
        return
    rng = jax.random.key(0)
    _, state = jax.eval_shape(env.reset, rng)
    actions = jax.ShapeDtypeStruct((env.num_agents,), jnp.int32)
    info = jax.eval_shape(env.step, rng, state, actions)[-1]
    require(
        key in info,
        f"algo.reward_shaping.info_key={key!r} is not in env {run.env.id!r}'s step info (keys: "
        f"{sorted(info)}); name one of them, or set it to '' to turn shaping off.",
    )
    shape = info[key].shape
    require(
        shape in ((), (env.num_agents,)) and jnp.issubdtype(info[key].dtype, jnp.number),
        f"algo.reward_shaping.info_key={key!r} is an array of shape {shape}, {info[key].dtype}; shaping "
        f"adds it to the per-agent reward, so it must be a number per agent ({env.num_agents},) or one ().",
    )


def resolve_config_argv(argv: Sequence[str], flag: str = "config", cwd: str | None = None) -> list[str]:
    """argv with `--config=FILE[:ARG]` (or `--config FILE[:ARG]`) made absolute against the repository when
    FILE is a relative path that does not exist from the working directory, so that
    `--config=configs/marl.py:smoke` works from any directory. A path found in neither place is a
    ConfigError naming both; overrides (`--config.KEY=VALUE`) are left as they are."""
    cwd = os.getcwd() if cwd is None else cwd
    out = list(argv)

    def resolve(spec: str) -> str:
        path, sep, arg = spec.partition(":")
        if os.path.isabs(path) or os.path.isfile(os.path.join(cwd, path)):
            return spec
        in_repo = os.path.join(REPO_ROOT, path)
        require(
            os.path.isfile(in_repo),
            f"--{flag}={spec}: no such file {path!r} in the working directory ({cwd}) nor in the "
            f"repository ({REPO_ROOT}); e.g. --{flag}=configs/marl.py:smoke.",
        )
        return in_repo + sep + arg

    for i, item in enumerate(out):
        if item == "--":
            break
        name, sep, value = item.lstrip("-").partition("=")
        if not item.startswith("-") or name != flag:
            continue
        if sep:
            out[i] = item[: len(item) - len(value)] + resolve(value)
        elif i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out
