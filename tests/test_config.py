"""Every bad configuration fails at the boundary with one message naming the value and the fix."""

import pytest

from configs import lm
from jaxpar.config import ConfigError, MeshConfig, from_config_dict, validate_run


def run_config(**overrides):
    c = lm.get_config("smoke").to_dict()
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        target = c
        for section in sections:
            target = target[section]
        target[key] = value
    return from_config_dict(c)


@pytest.mark.parametrize("preset", sorted(lm.PRESETS))
def test_presets_build(preset):
    run = from_config_dict(lm.get_config(preset))
    assert run.model.n_params > 0


def test_preset_sizes():
    small = from_config_dict(lm.get_config("small")).model.n_params
    assert 10e6 < small < 100e6, small
    assert 1.0e9 < from_config_dict(lm.get_config("llama_1b")).model.n_params < 1.6e9
    assert 6.0e9 < from_config_dict(lm.get_config("llama_7b")).model.n_params < 7.5e9


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'tiny'.*smoke"):
        lm.get_config("tiny")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.n_layerz": 2}, r"unknown config key\(s\) \['model.n_layerz'\]"),
        ({"model.d_model": "128"}, r"model.d_model='128' has type str; expected int"),
        ({"model.tie_embeddings": 1}, r"model.tie_embeddings=1 has type int; expected bool"),
        ({"model.n_heads": 5}, r"model.n_heads=5 is not a multiple of model.n_kv_heads=2"),
        ({"model.remat": "some"}, r"model.remat='some' is not supported; choose one of"),
        ({"model.attention_impl": "flash"}, r"model.attention_impl='flash' is not supported"),
        ({"pipeline.schedule": "pipedream"}, r"pipeline.schedule='pipedream' is not supported"),
        ({"model.mixer": "mamba"}, r"model.mixer='mamba' is not supported; choose one of"),
        (
            {"model.moe.top_k": 3, "model.moe.experts": 2},
            r"model.moe.top_k=3 must be between 1 and "
            r"model.moe.experts=2",
        ),
        ({"model.moe.router": "relu"}, r"model.moe.router='relu' is not supported"),
        ({"model.moe.capacity": 1.0}, r"unknown config key\(s\) \['model.moe.capacity'\]"),
        ({"mesh.data": -1, "mesh.fsdp": -1}, r"more than one axis set to -1"),
        ({"mesh.data": 0}, r"mesh.data=0 must be a positive int or -1"),
        ({"data.source": "text"}, r"data.source='text' needs data.path"),
        (
            {"train.global_batch": 10, "train.grad_accum_steps": 4},
            r"train.global_batch=10 is not divisible by "
            r"train.grad_accum_steps=4",
        ),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_config(**overrides)


def test_unknown_section():
    c = lm.get_config("smoke").to_dict()
    c["trainer"] = {}
    with pytest.raises(ConfigError, match=r"unknown config section\(s\) \['trainer'\]"):
        from_config_dict(c)


@pytest.mark.parametrize(
    "overrides, devices, message",
    [
        ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, 8, r"uses 4 devices but 8 are present"),
        ({"mesh.data": -1, "mesh.fsdp": 3, "mesh.tensor": 1}, 8, r"cannot fill 8 devices"),
        (
            {"train.global_batch": 10},
            8,
            r"train.global_batch=10 .* not divisible by mesh.data\*mesh.fsdp\*mesh.expert=4",
        ),
        (
            {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4},
            8,
            r"model.n_kv_heads=2 is not divisible by "
            r"mesh.tensor=4",
        ),
        (
            {"model.vocab_size": 258, "mesh.data": 2, "mesh.tensor": 4, "model.n_kv_heads": 4},
            16,
            r"model.vocab_size=258 is not divisible by mesh.tensor=4",
        ),
        (
            {"mesh.data": 1, "mesh.expert": 2},
            8,
            r"mesh.expert=2 needs model.moe.experts to be a positive "
            r"multiple of it \(got 0\)",
        ),
        (
            {"mesh.pipeline": 2, "mesh.fsdp": 1, "model.n_layers": 3},
            8,
            r"model.n_layers=3 is not divisible by mesh.pipeline\*pipeline.virtual_stages=2\*1",
        ),
        (
            {"mesh.pipeline": 2, "mesh.fsdp": 1, "train.grad_accum_steps": 2},
            8,
            r"train.grad_accum_steps=2 with mesh.pipeline=2",
        ),
        ({"train.seq_len": 4096}, 8, r"train.seq_len=4096 exceeds model.max_seq_len=2048"),
        (
            {"mesh.pipeline": 2, "mesh.fsdp": 1, "model.mixer": "linear"},
            8,
            r"model.mixer='linear': the pipeline stages run softmax-attention blocks only",
        ),
        (
            {"mesh.pipeline": 2, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.sequence": 2},
            8,
            r"mesh.sequence=2: the pipeline does not compose with sequence parallelism yet",
        ),
        (
            {"mesh.data": 1, "mesh.fsdp": 1, "mesh.sequence": 4, "train.seq_len": 100},
            8,
            r"train.seq_len=100 is not divisible by mesh.sequence\*mesh.tensor=8",
        ),
        (
            {"model.vocab_size": 128, "mesh.tensor": 1, "mesh.data": 4},
            8,
            r"model.vocab_size=128 is too small",
        ),
    ],
)
def test_run_errors(overrides, devices, message):
    with pytest.raises(ConfigError, match=message):
        validate_run(run_config(**overrides), devices)


def test_mesh_fill():
    assert MeshConfig(data=-1, tensor=2).resolve(8) == dict(
        pipeline=1, data=4, fsdp=1, expert=1, sequence=1, tensor=2
    )
