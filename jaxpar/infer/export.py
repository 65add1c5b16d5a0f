"""A training run as a Hugging Face checkpoint directory: config.json, safetensors shards with their index,
and the run's tokenizer files when it had a real tokenizer (a byte-level run has none transformers can load).
`transformers.AutoModelForCausalLM.from_pretrained(out)` then computes the run's logits."""

from __future__ import annotations

import json
import os

from flax import nnx

from jaxpar.data.tokenizer import save_tokenizer_files
from jaxpar.infer.model import inference_mesh, load_workdir
from jaxpar.interop import hf_config, hf_weights


def export_workdir(
    workdir: str, out: str, *, step: int | None = None, dtype: str = "float32", max_shard_mb: int = 2048
) -> dict:
    """Writes the run's checkpoint (newest intact, or `step`) to `out`; returns a summary (files, step,
    model_type). Refuses to write into a non-empty `out` (never overwrites an existing checkpoint)."""
    if dtype not in hf_weights.DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not supported; choose one of {sorted(hf_weights.DTYPES)}.")
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"--out={out!r} is not empty; choose a new directory (nothing was written).")
    model = load_workdir(workdir, inference_mesh(), step)
    tokenizer = model.tokenizer
    special = {
        "bos_token_id": getattr(tokenizer, "bos_id", None),
        "eos_token_id": getattr(tokenizer, "eos_id", None),
    }
    config = hf_config.hf_config(model.cfg, dtype=dtype, **special)  # fails before anything is written
    os.makedirs(out, exist_ok=True)
    files = hf_weights.save_params(
        nnx.to_pure_dict(model.params), model.cfg, out, dtype=dtype, max_shard_mb=max_shard_mb
    )
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    files.append("config.json")
    save_tokenizer_files(tokenizer, out)  # nothing for a byte-level run: transformers has no such tokenizer
    files += sorted(name for name in os.listdir(out) if name.startswith(("tokenizer", "special_tokens")))
    return {"out": out, "model": model.name, "model_type": config["model_type"], "files": sorted(files)}
