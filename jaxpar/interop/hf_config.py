"""Hugging Face `config.json` <-> jaxpar model fields, for the decoder families jaxpar's Transformer computes
exactly: Llama 2 / 3.x (llama3 rope scaling, tied or untied embeddings), Mistral (sliding window), Qwen2
(q/k/v biases), Qwen3 (q/k norms), Mixtral and Qwen3-MoE (every layer a mixture of experts).

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
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
MOE_TYPES = ("mixtral", "qwen3_moe")


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
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        _require(hf, where, "use_sliding_window", (False,), False)
    if model_type != "qwen2":  # these families put a bias on the output projection too; jaxpar has none
        _require(hf, where, "attention_bias", (False,), False)
    if model_type == "qwen3_moe":
        _require(hf, where, "decoder_sparse_step", (1,), 1)
        _require(hf, where, "mlp_only_layers", ([],), [])
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
        "attention_bias": model_type == "qwen2",  # q, k and v biases, none on the output
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
    elif model_type == "qwen3_moe":
        fields["moe"] = {
            "experts": hf.get("num_experts") or hf["num_local_experts"],  # transformers 4 / 5 name
            "top_k": hf["num_experts_per_tok"],
            "d_ff": hf["moe_intermediate_size"],
            "normalize_weights": bool(hf.get("norm_topk_prob", True)),
        }
    else:
        fields["moe"] = {"experts": 0}
    if "moe" in fields and fields["moe"]["experts"]:
        fields["moe"] |= {
            "router": "softmax",
            "shared_experts": 0,
            "capacity_factor": 0.0,
            "balance": "aux_loss",
        }
        fields["moe"]["aux_loss_coef"] = float(hf.get("router_aux_loss_coef", 0.001))
    return fields


def model_type_of(cfg) -> str:
    """The HF family a jaxpar ModelConfig exports as; HFConfigError for what no family computes."""
    if cfg.mixer != "softmax":
        raise HFConfigError(f"model.mixer={cfg.mixer!r} has no Hugging Face family; only 'softmax' exports.")
    if cfg.moe.experts:
        moe = cfg.moe
        if moe.shared_experts or moe.router != "softmax" or moe.balance != "aux_loss":
            raise HFConfigError(
                "an MoE with shared experts, a sigmoid router or bias balancing has no Hugging Face family "
                f"(model.moe={moe}); Mixtral / Qwen3-MoE export needs shared_experts=0, router='softmax', "
                "balance='aux_loss'."
            )
        if cfg.attention_bias:
            raise HFConfigError("model.attention_bias with experts has no Hugging Face family.")
        if cfg.qk_norm and not cfg.sliding_window:
            return "qwen3_moe"
        if cfg.qk_norm or not moe.normalize_weights:
            raise HFConfigError(
                "an MoE with model.qk_norm and a sliding window, or model.moe.normalize_weights=False "
                "without model.qk_norm, has no Hugging Face family (Mixtral normalises its top-k weights)."
            )
        return "mixtral"
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
    if model_type == "qwen3_moe":
        config |= {
            "num_experts": cfg.moe.experts,
            "num_experts_per_tok": cfg.moe.top_k,
            "moe_intermediate_size": cfg.moe.d_ff,
            "norm_topk_prob": cfg.moe.normalize_weights,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "router_aux_loss_coef": cfg.moe.aux_loss_coef,
        }
    return config
