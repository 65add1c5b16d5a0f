"""Every bad configuration fails at the boundary with one message naming the value and the fix."""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import pytest

from configs import lm
from jaxpar.config import ConfigError, MeshConfig, check_overrides, from_config_dict, validate_run
from jaxpar.parallel.mesh import make_mesh
from jaxpar.train import build as build_lib, fit
from jaxpar.train.loop import train


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


# --- a misspelled --config override: one line before absl parses the flags (issue 14, item 5) ---

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM_CONFIG = os.path.join(ROOT, "configs", "lm.py")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.mesh.dta=2"],
            r"^unknown config key\(s\) \['mesh.dta'\]; known keys of mesh: .* mean mesh.data\?$",
        ),
        (["--config.train.stpes", "10"], r"\['train.stpes'\].* Did you mean train.steps\?"),
        (
            ["--noconfig.model.tie_embedings"],
            r"\['model.tie_embedings'\].* Did you mean model.tie_embeddings\?",
        ),
        (
            ["--config.model.moe.capcity_factor=1.0"],
            r"\['model.moe.capcity_factor'\]; known keys of model.moe",
        ),
        (["--config.trian.steps=3"], r"unknown config section\(s\) \['trian'\].* Did you mean train\?"),
        (["--config.train.steps.max=3"], r"train.steps=150 is a value, not a section"),
    ],
)
def test_misspelled_override_is_one_config_error(args, message):
    with pytest.raises(ConfigError, match=message):
        check_overrides(["train_lm.py", f"--config={LM_CONFIG}:smoke", *args])


def test_good_overrides_and_where_the_config_comes_from(tmp_path):
    good = ["--config.train.steps=5", "--config.model.moe.experts", "4", "--noconfig.model.tie_embeddings"]
    check_overrides(["x", f"--config={LM_CONFIG}:smoke", *good])
    check_overrides(["x", "--config", f"{LM_CONFIG}:smoke", *good])  # absl's space-separated form
    check_overrides(["x", *good], default=f"{LM_CONFIG}:smoke")  # a flag default, as the benches have
    check_overrides(["x", "--workdir=/tmp/w"])  # no --config: absl reports the missing flag
    flagfile = tmp_path / "flags"
    flagfile.write_text(f"--config={LM_CONFIG}:smoke\n--config.mesh.dta=2\n")
    with pytest.raises(ConfigError, match=r"\['mesh.dta'\]"):
        check_overrides(["x", f"--flagfile={flagfile}"])
    with pytest.raises(ConfigError, match=r"^--config=.*lm.py:tiny: unknown preset 'tiny'"):
        check_overrides(["x", f"--config={LM_CONFIG}:tiny"])
    with pytest.raises(ConfigError, match=r"no such file 'configs/nope.py'"):
        check_overrides(["x", "--config=configs/nope.py:smoke"])


def test_launcher_checks_overrides_before_parsing(monkeypatch):
    from jaxpar.launch import cli

    monkeypatch.setattr(sys, "argv", ["submit.py", f"--config={LM_CONFIG}:smoke", "--config.mesh.dta=2"])
    with pytest.raises(SystemExit, match=r"^error: unknown config key\(s\) \['mesh.dta'\].*mesh.data\?$"):
        cli.run(lambda argv: 0)


@pytest.mark.parametrize(
    "script, config, override, suggestion",
    [
        ("train_lm.py", "lm.py:smoke", "--config.train.stpes=10", "Did you mean train.steps?"),
        ("train_marl.py", "marl.py:smoke", "--config.mesh.dta=2", "Did you mean mesh.data?"),
    ],
)
def test_entry_points_print_one_line(tmp_path, script, config, override, suggestion):
    """Before: ml_collections' flag parser printed a 53-line traceback ending in an AttributeError."""
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", script),
            f"--config={os.path.join(ROOT, 'configs', config)}",
            f"--workdir={tmp_path}",
            override,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key(s)"), result.stderr
    assert override.split("=")[0].removeprefix("--config.") in lines[0] and suggestion in lines[0]
    assert not os.listdir(tmp_path)  # nothing started


# --- sizes that cannot fit refuse before anything is allocated (issue 14, item 6) ---


def program_for(run):
    return build_lib.build(run, make_mesh(validate_run(run, 8)))


@pytest.mark.parametrize("preset", ["smoke", "moe_smoke", "long_smoke", "small"])
def test_small_presets_fit_this_machine(preset):
    need = program_for(from_config_dict(lm.get_config(preset))).check_fits()
    assert 0 < need["total"] < 2**30 and need["total"] == sum(v for k, v in need.items() if k != "total")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.n_layers": 100000}, r"the model's state alone needs .*model.n_layers=100000"),
        ({"train.global_batch": 1048576}, r"the activations alone need .*train.global_batch=1048576"),
    ],
)
def test_absurd_sizes_refuse_before_allocating(tmp_path, overrides, message):
    """Before: train() went on to create the state (and the first batch) of this size."""
    with pytest.raises(ConfigError, match=message) as error:
        train(run_config(**overrides), str(tmp_path))
    assert re.match(
        r"this run needs about [\d.]+ GiB per device \(params .*\) but a device has", str(error.value)
    )
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_fit_check_is_for_running_not_compiling():
    """The real-size presets build (and so compile ahead, tests/test_presets.py) on this machine's 8 CPU
    devices; only running them is refused, by the numbers."""
    run = from_config_dict(lm.get_config("llama_7b"))
    run = dataclasses.replace(
        run,
        mesh=MeshConfig(data=1, fsdp=2, tensor=4),
        train=dataclasses.replace(run.train, global_batch=8, seq_len=512),
    )
    program = program_for(run)
    with pytest.raises(ConfigError, match=r"needs about 13\.\d\d GiB .* a device has 1\.00 GiB \(as given\)"):
        program.check_fits(bytes_limit=2**30)
    assert program.check_fits(bytes_limit=2**40)["params"] == pytest.approx(
        run.model.n_params * 4 / 8, rel=0.01
    )


def test_cpu_device_memory_is_the_hosts_share():
    limit, source = fit.device_memory(jax.devices()[0])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert limit == host // jax.local_device_count() and "host memory shared by 8 CPU devices" in source
