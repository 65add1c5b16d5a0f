"""Hugging Face interop against transformers itself (torch, CPU): for every supported family a tiny random
transformers model saved to disk is imported shard by shard and gives transformers' logits (whole documents
and a packed row of several documents, on 1 device and on an fsdp x tensor (x expert) mesh); export
round-trips to identical tensors; bad checkpoints are one clear error."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxpar import config as config_lib
from jaxpar.infer.model import inference_mesh
from jaxpar.interop import hf_weights
from jaxpar.train import build as build_lib

VOCAB, LENGTH = 96, 16
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama_tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True),
    ),
    # MoE layers among dense ones: layers 0-1 dense, then every second layer MoE (layers 3 and 5 of 6)
    "qwen3_moe_sparse": (
        transformers.Qwen3MoeConfig,
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            decoder_sparse_step=2,
            mlp_only_layers=[0, 1],
            num_hidden_layers=6,
        ),
    ),
    # a gated shared expert (2 x moe_intermediate_size), top-k weights not renormalised, every second layer
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=2,
        ),
    ),
}


def save_tiny(kind: str, directory) -> transformers.PreTrainedModel:
    """A random transformers model of `kind` saved to `directory`; every parameter (norms and biases too)
    perturbed so that none is a trivial 0 or 1."""
    config_cls, extra = FAMILIES[kind]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**COMMON | extra)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (directory, transformers model)."""
    root = tmp_path_factory.mktemp("hf")
    return {kind: (str(root / kind), save_tiny(kind, root / kind)) for kind in FAMILIES}


def imported(directory: str, mesh_sizes: dict):
    """(model config, parameters as an nnx.State on the mesh, mesh)."""
    cfg = config_lib.from_config_dict({"model": {"hf_path": directory}}).model
    mesh = inference_mesh(mesh_sizes)
    params = build_lib.load_hf_params(cfg, mesh)
    return cfg, params, mesh


def test_every_family_gives_transformers_logits(saved):
    """Rows 0-1: whole documents; row 2: two documents packed (segment ids, positions restarting); row 3:
    one short document then padding. Each row's logits equal transformers' on each document alone."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB, n) for n in (LENGTH, LENGTH, 9, 7, 11)]
    tokens = np.zeros((4, LENGTH), np.int32)
    segments = np.zeros((4, LENGTH), np.int32)
    positions = np.zeros((4, LENGTH), np.int32)
    layout = [[(0, docs[0])], [(0, docs[1])], [(0, docs[2]), (9, docs[3])], [(0, docs[4])]]
    for row, pieces in enumerate(layout):
        for segment, (start, doc) in enumerate(pieces, 1):
            tokens[row, start : start + len(doc)] = doc
            segments[row, start : start + len(doc)] = segment
            positions[row, start : start + len(doc)] = np.arange(len(doc))
    for kind, (directory, reference) in saved.items():
        moe = "moe" in kind or kind == "mixtral"
        for sizes in ({}, {"fsdp": 2, "tensor": 2, "expert": 2 if moe else 1}):
            cfg, params, mesh = imported(directory, sizes)
            graphdef, _ = build_lib.abstract_model(cfg)
            with jax.set_mesh(mesh):
                logits = jax.jit(lambda p, *b: nnx.merge(graphdef, p)(*b))(
                    params, tokens, positions, segments
                )
            logits = np.asarray(logits)
            for row, pieces in enumerate(layout):
                for start, doc in pieces:
                    with torch.no_grad():
                        expected = reference(torch.tensor(doc[None])).logits[0].numpy()
                    got = logits[row, start : start + len(doc)]
                    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"{kind} {sizes}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_round_trips_to_identical_tensors(saved, tmp_path, dtype):
    for kind, (directory, _) in saved.items():
        cfg, params, _ = imported(directory, {"fsdp": 2, "tensor": 2})
        out = tmp_path / f"{kind}-{dtype}"
        files = hf_weights.save_params(nnx.to_pure_dict(params), cfg, str(out), dtype=dtype, max_shard_mb=0)
        assert len(files) > 2, "max_shard_mb=0 puts each tensor in a file of its own, with an index"
        original = hf_weights.tensor_files(directory)
        written = hf_weights.tensor_files(str(out))
        assert set(written) == {name for name in original if not hf_weights.IGNORED.match(name)} | (
            {"lm_head.weight"} if "lm_head.weight" in original and not cfg.tie_embeddings else set()
        )
        for name, file in written.items():
            with safe_open(original[name], "numpy") as a, safe_open(file, "numpy") as b:
                want = a.get_tensor(name).astype(hf_weights.DTYPES[dtype])
                np.testing.assert_array_equal(b.get_tensor(name), want, err_msg=f"{kind} {name}")


def test_unsupported_architectures_and_options_name_the_field(saved, tmp_path):
    directory = tmp_path / "other"
    shutil.copytree(saved["llama3"][0], directory)
    config = json.loads((directory / "config.json").read_text())
    cases = {
        "model_type": ("gpt2", "model_type='gpt2' is not supported"),
        "hidden_act": ("gelu", "hidden_act='gelu' is not supported"),
        "rope_parameters": ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope type 'yarn'"),
        "attention_bias": (True, "attention_bias=True is not supported"),
    }
    for key, (value, message) in cases.items():
        (directory / "config.json").write_text(json.dumps(config | {key: value}))
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.from_config_dict({"model": {"hf_path": str(directory)}})
    with pytest.raises(config_lib.ConfigError, match="has no config.json"):
        config_lib.from_config_dict({"model": {"hf_path": str(tmp_path / "nowhere")}})


def test_missing_and_misshapen_tensors_are_named_before_reading(saved, tmp_path):
    source = saved["qwen2"][0]
    directory = tmp_path / "broken"
    shutil.copytree(source, directory)
    file = directory / "model.safetensors"
    with safe_open(str(file), "numpy") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    name = "model.layers.1.self_attn.k_proj.bias"

    def expect(tensors, message):
        save_file(tensors, str(file), metadata={"format": "pt"})
        with pytest.raises(hf_weights.HFWeightsError, match=message):
            imported(str(directory), {})

    expect({k: v for k, v in tensors.items() if k != name}, f"no tensor '{name}'")
    expect(
        tensors | {name: np.zeros(3, np.float32)},
        rf"tensor '{name}' .* has shape \[3\]; config.json implies \[16\]",
    )
    expect(tensors | {"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}, "has no place for")
    file.write_bytes(file.read_bytes()[:100])  # truncated
    with pytest.raises(hf_weights.HFWeightsError, match="cannot read .*model.safetensors"):
        imported(str(directory), {})
    assert os.path.isfile(file), "nothing in the checkpoint directory is changed or deleted"
