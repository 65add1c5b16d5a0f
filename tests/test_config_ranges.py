"""Every numeric config field has a range (its class's RANGES table), so no value outside its meaning, no
NaN and no inf reaches a run, and a field added without one fails here."""

from __future__ import annotations

import dataclasses
import math
import typing
from unittest import mock

import pytest

from configs import lm, marl
from jaxpar import config as config_lib
from jaxpar.config import Bound, ConfigError, RunConfig, from_config_dict, validate_run
from jaxpar.rl import config as rl_config
from jaxpar.rl.config import MARLRunConfig


def config_classes() -> dict[type, str]:
    """Every config dataclass reachable from the LM and MARL run configs, nested ones (model.moe)
    included, with its section name."""
    found: dict[type, str] = {}

    def visit(cls: type, section: str) -> None:
        for field in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[field.name]
            if dataclasses.is_dataclass(hint):
                name = f"{section}.{field.name}" if section else field.name
                found.setdefault(hint, name)
                visit(hint, name)

    visit(RunConfig, "")
    visit(MARLRunConfig, "")
    return found


def numeric_fields() -> list[tuple[type, str, str, type]]:
    """(class, section, field, int or float) of every numeric field of every config dataclass."""
    return [
        (cls, section, field.name, hint)
        for cls, section in config_classes().items()
        for field in dataclasses.fields(cls)
        if (hint := typing.get_type_hints(cls)[field.name]) in (int, float)
    ]


def test_the_walk_sees_every_section():
    sections = set(config_classes().values())
    assert {"model", "model.moe", "mesh", "optimizer", "train", "pipeline", "data"} <= sections
    assert {"env", "algo", "network", "eval"} <= sections
    assert len(numeric_fields()) > 60


def test_every_numeric_field_has_a_range():
    missing = [
        f"{section}.{name} ({cls.__name__})"
        for cls, section, name, _ in numeric_fields()
        if name not in getattr(cls, "RANGES", {})
    ]
    assert not missing, f"add these fields to their class's RANGES table (jaxpar.config.Bound): {missing}"
    for cls in config_classes():
        table = getattr(cls, "RANGES", {})
        fields = {field.name for field in dataclasses.fields(cls)}
        assert set(table) <= fields, f"{cls.__name__}.RANGES names no field {sorted(set(table) - fields)}"
        for name, bound in table.items():
            default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
            assert isinstance(bound, Bound) and bound.admits(default), (cls.__name__, name, default)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_no_numeric_field_takes_nan_or_inf(bad):
    for cls, section, name, kind in numeric_fields():
        said = "must be a finite number" if kind is float else "has type float; expected int"
        with pytest.raises(ConfigError, match=rf"^{section}\.{name}={bad} {said}"):
            cls(**{name: bad})


def test_int_fields_take_no_floats():
    for cls, section, name, kind in numeric_fields():
        if kind is int:
            with pytest.raises(ConfigError, match=rf"{section}\.{name}=2\.5 has type float; expected int"):
                cls(**{name: 2.5})


def lm_run(**overrides):
    raw = lm.get_config("smoke").to_dict()
    for dotted, value in overrides.items():
        section, key = dotted.rsplit(".", 1)
        node = raw
        for part in section.split("."):
            node = node[part]
        node[key] = value
    return from_config_dict(raw)


# Each of these values was accepted before the RANGES tables (jaxpar.config at f7238a7).
LM_BAD = [
    ("optimizer.grad_clip_norm", -1.0, r"optimizer.grad_clip_norm=-1.0 must be a finite number > 0"),
    ("optimizer.grad_clip_norm", 0.0, r"0 would zero every gradient"),
    ("optimizer.b1", 1.0, r"optimizer.b1=1.0 must be a finite number in \[0, 1\) \(Adam's first"),
    ("optimizer.b1", -0.5, r"optimizer.b1=-0.5 must be a finite number in \[0, 1\)"),
    ("optimizer.b2", 1.5, r"optimizer.b2=1.5 must be a finite number in \[0, 1\)"),
    ("optimizer.b2", -0.1, r"optimizer.b2=-0.1 must be"),
    ("optimizer.weight_decay", -0.1, r"optimizer.weight_decay=-0.1 must be a finite number >= 0"),
    ("optimizer.learning_rate", math.inf, r"optimizer.learning_rate=inf must be a finite number > 0"),
    ("model.rope_theta", math.inf, r"model.rope_theta=inf must be"),
    ("optimizer.eps", 0.0, r"optimizer.eps=0.0 must be a finite number > 0"),
    ("optimizer.eps", -1e-8, r"optimizer.eps=-1e-08 must be"),
    ("model.norm_eps", -1e-5, r"model.norm_eps=-1e-05 must be a finite number > 0"),
    ("model.norm_eps", 0.0, r"model.norm_eps=0.0 must be"),
    ("model.rope_theta", 0.5, r"model.rope_theta=0.5 must be a finite number > 1"),
    ("model.init_std", -0.02, r"model.init_std=-0.02 must be a finite number > 0"),
    ("model.moe.bias_update_rate", -1e-3, r"model.moe.bias_update_rate=-0.001 must be a finite number >= 0"),
    ("model.moe.aux_loss_coef", -1.0, r"model.moe.aux_loss_coef=-1.0 must be a finite number >= 0"),
    ("model.moe.z_loss_coef", math.nan, r"model.moe.z_loss_coef=nan must be"),
    ("train.seed", -1, r"train.seed=-1 must be an int in \[0, 4294967296\)"),
]


@pytest.mark.parametrize("key, value, message", LM_BAD, ids=[f"{k}={v}" for k, v, _ in LM_BAD])
def test_lm_values_outside_their_meaning(key, value, message):
    with pytest.raises(ConfigError, match=message) as error:
        lm_run(**{key: value})
    assert "the default is" in str(error.value)  # the fix: a value that works


def test_warmup_longer_than_the_run():
    """The lr ramps from 0 (step s trains with the schedule at s - 1): a warmup far past the run's end
    means it never trains at a useful learning rate."""
    with pytest.raises(ConfigError, match=r"warmup_steps=2000 with train.steps=150: .* more than 7% of"):
        validate_run(lm_run(**{"optimizer.warmup_steps": 2000}), 8)
    with pytest.raises(ConfigError, match=r"warmup_steps=15 with train.steps=1: .* more than 0% "):
        validate_run(lm_run(**{"train.steps": 1}), 8)
    with mock.patch.object(config_lib.logging, "warning") as warning:
        validate_run(lm_run(**{"train.steps": 4}), 8)  # quick smoke runs still reach a fifth of the peak
    assert (
        "reaching at most 20% of optimizer.learning_rate"
        in warning.call_args.args[0] % warning.call_args.args[1:]
    )
    with mock.patch.object(config_lib.logging, "warning") as warning:
        validate_run(lm_run(**{"train.steps": 1, "optimizer.warmup_steps": 0}), 8)
        validate_run(lm_run(**{"train.steps": 20, "optimizer.warmup_steps": 10}), 8)
    warning.assert_not_called()


def marl_run(**overrides):
    raw = marl.get_config("smoke").to_dict()
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return rl_config.from_config_dict(raw)


MARL_BAD = [
    ("algo.lr", math.inf, r"algo.lr=inf must be a finite number > 0"),
    ("algo.vf_coef", math.inf, r"algo.vf_coef=inf must be a finite number >= 0"),
    ("algo.max_grad_norm", math.inf, r"algo.max_grad_norm=inf must be"),
    ("algo.clip_eps", math.inf, r"algo.clip_eps=inf must be"),
    ("algo.ent_coef", math.inf, r"algo.ent_coef=inf must be a finite number >= 0"),
]


@pytest.mark.parametrize("key, value, message", MARL_BAD, ids=[f"{k}={v}" for k, v, _ in MARL_BAD])
def test_marl_values_outside_their_meaning(key, value, message):
    with pytest.raises(ConfigError, match=message):
        marl_run(**{key: value})


def test_messages_keep_their_words():
    """Messages other tests and users match on stay as they were."""
    with pytest.raises(ConfigError, match=r"mesh.data=0 must be a positive int or -1"):
        config_lib.MeshConfig(data=0)
    with pytest.raises(ConfigError, match=r"pipeline.microbatches=0 must be a positive int"):
        config_lib.PipelineConfig("gpipe", 0)
    with pytest.raises(ConfigError, match=r"model.moe.experts=-1 must be an int >= 0 \(0 = dense MLPs\)"):
        config_lib.MoEConfig(experts=-1)
