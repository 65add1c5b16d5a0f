"""Every parameter's PartitionSpec follows the rules table: golden files per preset x mesh, and a check
that a mesh able to shard parameters is not left holding them replicated."""

import json
import os

import jax
import pytest
from jax.sharding import PartitionSpec as P

from configs import lm
from jaxpar.config import MeshConfig, from_config_dict
from jaxpar.parallel import rules
from jaxpar.train import build as build_lib
from lm_testing import config_mesh

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
CASES = [
    ("smoke", "data2_fsdp2_tensor2", MeshConfig(data=2, fsdp=2, tensor=2)),
    ("smoke", "fsdp8", MeshConfig(data=1, fsdp=8)),
    ("small", "fsdp4_tensor2", MeshConfig(data=1, fsdp=4, tensor=2)),
    ("llama_1b", "fsdp8", MeshConfig(data=1, fsdp=8)),
    ("llama_7b", "fsdp1_tensor8", MeshConfig(data=1, fsdp=1, tensor=8)),
]


def specs_by_path(preset, mesh_config):
    """Abstract only (no arrays), so the real-size presets cost nothing."""
    model_cfg = from_config_dict(lm.get_config(preset)).model
    _, abstract_params = build_lib.abstract_model(model_cfg)
    shardings = rules.tree_shardings(
        config_mesh(mesh_config), abstract_params, rules.param_specs(abstract_params)
    )
    return {
        jax.tree_util.keystr(path): [list(a) if isinstance(a, tuple) else a for a in sharding.spec]
        for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]
    }


@pytest.mark.parametrize("preset, mesh_name, mesh_config", CASES, ids=[f"{p}-{m}" for p, m, _ in CASES])
def test_partition_specs_match_golden(preset, mesh_name, mesh_config):
    got = specs_by_path(preset, mesh_config)
    path = os.path.join(GOLDEN_DIR, f"sharding_{preset}_{mesh_name}.json")
    if os.environ.get("UPDATE_GOLDEN"):
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(path, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
    with open(path) as f:
        assert got == json.load(f)


def test_golden_specs_follow_the_rules_table():
    """The golden file agrees with what the rules say for these parameters' logical names."""
    want = {
        "['blocks']['attn']['wq'].value": P("layers", "embed", "heads", "head_dim"),
        "['blocks']['mlp']['w_down'].value": P("layers", "mlp", "embed"),
        "['embed'].value": P("vocab", "embed"),
    }
    with open(os.path.join(GOLDEN_DIR, "sharding_smoke_data2_fsdp2_tensor2.json")) as f:
        got = json.load(f)
    for path, logical in want.items():
        assert got[path] == [
            list(a) if isinstance(a, tuple) else a for a in rules.logical_to_spec(tuple(logical))
        ], path
    assert got["['blocks']['attn']['wq'].value"] == ["pipeline", "fsdp", "tensor", None]


def test_unknown_logical_name():
    with pytest.raises(KeyError, match="logical axis 'heds' is not in"):
        rules.logical_to_spec(("heds",))


def test_mostly_replicated_parameters_are_refused():
    mesh = config_mesh(MeshConfig(data=1, fsdp=8))
    tree = {"w": jax.ShapeDtypeStruct((64, 64), "float32")}
    shardings = rules.tree_shardings(mesh, tree, {"w": P()})
    with pytest.raises(ValueError, match="100% of parameter bytes would be replicated"):
        rules.check_sharded(mesh, tree, shardings)


def test_indivisible_dimension_names_the_parameter():
    mesh = config_mesh(MeshConfig(data=1, fsdp=8))
    tree = {"w": jax.ShapeDtypeStruct((12, 64), "float32")}
    with pytest.raises(ValueError, match=r"\['w'\]: dimension 12 of shape \(12, 64\) cannot be split 8 ways"):
        rules.tree_shardings(mesh, tree, {"w": P("fsdp")})
