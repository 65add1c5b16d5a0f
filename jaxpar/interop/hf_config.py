"""Hugging Face `config.json` <-> jaxpar model fields, for the decoder families jaxpar's Transformer computes
exactly: Llama 2 / 3.x (llama3 rope scaling, tied or untied embeddings), Mistral (sliding window), Qwen2
(q/k/v biases), Qwen3 (q/k norms), Mixtral, Qwen2-MoE (gated shared expert) and Qwen3-MoE; MoE layers may
alternate with dense ones (decoder_sparse_step, dense first layers: model.moe.every and first_dense).

Plain dicts both ways (this layer knows nothing of jaxpar's config types): `model_fields` gives the
`config.model` entries an HF config implies, `hf_config` the config.json a jaxpar model exports as. Anything
the model cannot compute (another architecture, activation, rope type, per-layer sliding windows, ...) is one
HFConfigError naming the field, its value and what is supported.
"""

from __future__ import annotations

import json
import os
from typing import Any

ARCHITECTURES = {  # model_type -> the transformers class a checkpoint of it loads as
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


class HFConfigError(ValueError):
    """A Hugging Face config.json jaxpar cannot load exactly; the message names the field and the fix."""


def read_config(directory: str) -> dict[str, Any]:
    """DIR/config.json as a dict; a missing or unreadable file is one HFConfigError naming it."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise HFConfigError(
            f"model.hf_path={directory!r} has no config.json; point it at a Hugging Face checkpoint "
            "directory (config.json, *.safetensors, tokenizer.json)."
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise HFConfigError(f"cannot read {path}: {error}") from error
    if not isinstance(config, dict):
        raise HFConfigError(f"{path} holds a {type(config).__name__}, not a JSON object.")
    return config


def _rope(hf: dict, where: str) -> dict[str, Any]:
    """rope_theta and llama3 scaling, from transformers 5's `rope_parameters` or 4's `rope_theta` +
    `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    fields: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return fields | {"rope_scaling": "none"}
    if kind != "llama3":
        raise HFConfigError(
            f"{where}: rope type {kind!r} is not supported; jaxpar computes 'default' and 'llama3' rope."
        )
    source = params if params.get("rope_type") == "llama3" else scaling
    return fields | {
        "rope_scaling": "llama3",
        "rope_factor": float(source["factor"]),
        "rope_low_freq_factor": float(source["low_freq_factor"]),
        "rope_high_freq_factor": float(source["high_freq_factor"]),
        "rope_original_max_len": int(source["original_max_position_embeddings"]),
    }


def _require(hf: dict, where: str, key: str, allowed, default=None) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise HFConfigError(
            f"{where}: {key}={value!r} is not supported; jaxpar computes {key} in {list(allowed)} only."
        )


def model_fields(hf: dict, where: str = "config.json") -> dict[str, Any]:
    """The `config.model` entries (with a nested `moe` dict) of the architecture described by an HF config."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HFConfigError(
            f"{where}: model_type={model_type!r} is not supported; jaxpar loads {sorted(ARCHITECTURES)}."
        )
    _require(hf, where, "hidden_act", ("silu",), "silu")
    _require(hf, where, "mlp_bias", (False,), False)
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        _require(hf, where, "use_sliding_window", (False,), False)
    if model_type not in ("qwen2", "qwen2_moe"):  # these bias the output projection too; jaxpar does not
        _require(hf, where, "attention_bias", (False,), False)
    if model_type == "qwen2_moe":
        _require(hf, where, "qkv_bias", (True,), True)
    heads = hf["num_attention_heads"]
    fields: dict[str, Any] = {
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "d_ff": hf["intermediate_size"],
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention_bias": model_type in ("qwen2", "qwen2_moe"),  # q, k and v biases, none on the output
        "qk_norm": model_type in ("qwen3", "qwen3_moe"),
        "sliding_window": (hf.get("sliding_window") or 0) if model_type in ("mistral", "mixtral") else 0,
        "mixer": "softmax",
        **_rope(hf, where),
    }
    if model_type == "mixtral":
        fields["moe"] = {
            "experts": hf["num_local_experts"],
            "top_k": hf["num_experts_per_tok"],
            "d_ff": hf["intermediate_size"],
            "normalize_weights": True,
        }
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        fields["moe"] = {
            "experts": hf.get("num_experts") or hf["num_local_experts"],  # transformers 4 / 5 name
            "top_k": hf["num_experts_per_tok"],
            "d_ff": hf["moe_intermediate_size"],
            "normalize_weights": bool(hf.get("norm_topk_prob", model_type == "qwen3_moe")),
            **_sparse_layout(hf, where),
        }
        shared = hf.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
        if shared % hf["moe_intermediate_size"]:
            raise HFConfigError(
                f"{where}: shared_expert_intermediate_size={shared} is not a multiple of "
                f"moe_intermediate_size={hf['moe_intermediate_size']}; jaxpar's shared experts are "
                "model.moe.shared_experts units of model.moe.d_ff."
            )
        fields["moe"] |= {
            "shared_experts": shared // hf["moe_intermediate_size"],
            "shared_gate": bool(shared),
        }
    else:
        fields["moe"] = {"experts": 0}
    if fields["moe"]["experts"]:
        defaults = {"router": "softmax", "shared_experts": 0, "capacity_factor": 0.0, "balance": "aux_loss"}
        fields["moe"] = defaults | fields["moe"]
        fields["moe"]["aux_loss_coef"] = float(hf.get("router_aux_loss_coef", 0.001))
    return fields


def _sparse_layout(hf: dict, where: str) -> dict[str, int]:
    """first_dense and every of a Qwen-MoE config: HF's MoE layers are those not in mlp_only_layers with
    (index + 1) % decoder_sparse_step == 0; jaxpar's are the last of each group of `every` after
    `first_dense` dense layers. The two must name the same layers."""
    layers, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1) or 1
    dense_only = sorted(hf.get("mlp_only_layers") or [])
    first = len(dense_only)
    theirs = {i for i in range(layers) if i not in dense_only and (i + 1) % step == 0}
    ours = set(range(first + step - 1, layers, step)) if (layers - first) % step == 0 else None
    if dense_only != list(range(first)) or ours != theirs:
        raise HFConfigError(
            f"{where}: decoder_sparse_step={step} with mlp_only_layers={dense_only} makes layers "
            f"{sorted(theirs)} MoE; jaxpar's layout (first_dense dense layers, then every step-th layer MoE) "
            "cannot express that."
        )
    return {"first_dense": first, "every": step}


def model_type_of(cfg) -> str:
    """The HF family a jaxpar ModelConfig exports as; HFConfigError for what no family computes."""
    if cfg.mixer != "softmax":
        raise HFConfigError(f"model.mixer={cfg.mixer!r} has no Hugging Face family; only 'softmax' exports.")
    if cfg.moe.experts:
        moe = cfg.moe
        if moe.router != "softmax" or moe.balance != "aux_loss" or moe.shared_experts and not moe.shared_gate:
            raise HFConfigError(
                "an MoE with a sigmoid router, bias balancing, or shared experts without "
                f"model.moe.shared_gate has no Hugging Face family (model.moe={moe})."
            )
        if moe.first_dense % moe.every:
            raise HFConfigError(
                f"model.moe.first_dense={moe.first_dense} is not a multiple of model.moe.every={moe.every}: "
                "Qwen-MoE's decoder_sparse_step cannot place those MoE layers."
            )
        if cfg.attention_bias and moe.shared_gate and not (cfg.qk_norm or cfg.sliding_window):
            return "qwen2_moe"
        if cfg.qk_norm and not (cfg.attention_bias or moe.shared_gate or cfg.sliding_window):
            return "qwen3_moe"
        if not (cfg.qk_norm or cfg.attention_bias or moe.shared_gate or moe.mixed) and moe.normalize_weights:
            return "mixtral"
        raise HFConfigError(
            "this MoE has no Hugging Face family: Mixtral (no biases, norms, shared experts or dense layers; "
            "normalised top-k), Qwen2-MoE (q/k/v biases and a gated shared expert) or Qwen3-MoE (q/k norms)."
        )
    if cfg.attention_bias:
        if cfg.qk_norm or cfg.sliding_window:
            raise HFConfigError(
                "model.attention_bias with model.qk_norm or model.sliding_window has no Hugging Face family "
                "(Qwen2 has the biases, Qwen3 the norms, Mistral the window)."
            )
        return "qwen2"
    if cfg.qk_norm:
        if cfg.sliding_window:
            raise HFConfigError("model.qk_norm with model.sliding_window has no Hugging Face family.")
        return "qwen3"
    return "mistral" if cfg.sliding_window else "llama"


def hf_config(cfg, *, dtype: str, bos_token_id=None, eos_token_id=None) -> dict[str, Any]:
    """The config.json of a jaxpar ModelConfig; `model_fields` of it gives the same model back."""
    model_type = model_type_of(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope |= {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,  # Qwen2 has q/k/v biases without this flag; in the others it biases o too
        "mlp_bias": False,
        "rope_parameters": rope,
        # transformers 4 reads these two instead of rope_parameters
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling == "none" else rope,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if model_type in ("mistral", "mixtral"):
        config["sliding_window"] = cfg.sliding_window or None
    if model_type == "mixtral":
        config |= {
            "num_local_experts": cfg.moe.experts,
            "num_experts_per_tok": cfg.moe.top_k,
            "intermediate_size": cfg.moe.d_ff,
            "router_aux_loss_coef": cfg.moe.aux_loss_coef,
        }
    if model_type in ("qwen2_moe", "qwen3_moe"):
        config |= {
            "num_experts": cfg.moe.experts,
            "num_experts_per_tok": cfg.moe.top_k,
            "moe_intermediate_size": cfg.moe.d_ff,
            "norm_topk_prob": cfg.moe.normalize_weights,
            "decoder_sparse_step": cfg.moe.every,
            "mlp_only_layers": list(range(cfg.moe.first_dense)),
            "router_aux_loss_coef": cfg.moe.aux_loss_coef,
        }
    if model_type == "qwen2_moe":
        config |= {"qkv_bias": True, "shared_expert_intermediate_size": cfg.moe.shared_experts * cfg.moe.d_ff}
    return config
