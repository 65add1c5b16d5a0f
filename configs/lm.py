"""LM presets: `python experiments/train_lm.py --config=configs/lm.py:<preset>`.

smoke     a byte-level model that trains in about a minute on a 2-core CPU (8 simulated devices)
small     tens of millions of parameters, a CPU hour
llama_1b  Llama-3.2-1B shapes (for accelerators; validated and compiled abstractly in CI)
llama_7b  Llama-2-7B shapes (for accelerators; validated and compiled abstractly in CI)
moe_smoke smoke with 8 experts, expert parallel on CPU
long_smoke  smoke on 1024-token sequences split four ways (ring attention, zigzag layout)
mixtral_8x7b  Mixtral-8x7B shapes (for accelerators)
hf        fine-tune a Hugging Face checkpoint: --config.model.hf_path=DIR (architecture, weights and tokenizer
          from DIR; Llama, Mistral, Qwen2/3, Mixtral, Qwen3-MoE)
"""

import ml_collections

from jaxpar.config import RunConfig, config_dict


def base() -> ml_collections.ConfigDict:
    """The defaults of jaxpar.config's dataclasses on a data=2 x fsdp=2 x tensor=2 mesh."""
    c = config_dict(RunConfig())
    c.mesh.update(data=2, fsdp=2, tensor=2)
    return c


def smoke(c):
    c.train.steps = 150
    c.optimizer.warmup_steps = 15


def small(c):
    c.model.update(
        d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, d_ff=1536, tie_embeddings=True
    )
    c.train.update(
        steps=400, global_batch=16, seq_len=256, log_every=10, eval_every=100, checkpoint_every=100
    )
    c.optimizer.update(learning_rate=1e-3, warmup_steps=40)


def llama_1b(c):
    c.model.update(
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
        remat="save_dots",
        param_dtype="float32",
        dtype="bfloat16",
    )
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    c.data.update(source="tokens", path="/data/tokens/*.bin", token_dtype="uint32")
    c.train.update(
        steps=100000, global_batch=512, seq_len=4096, log_every=50, eval_every=2000, checkpoint_every=1000
    )
    c.optimizer.update(learning_rate=3e-4, warmup_steps=2000)


def llama_7b(c):
    c.model.update(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        d_ff=11008,
        max_seq_len=4096,
        tie_embeddings=False,
        remat="full",
        param_dtype="float32",
        dtype="bfloat16",
    )
    c.mesh.update(data=-1, fsdp=8, tensor=8)
    c.data.update(source="tokens", path="/data/tokens/*.bin", token_dtype="uint16")
    c.train.update(
        steps=100000, global_batch=1024, seq_len=4096, log_every=50, eval_every=2000, checkpoint_every=1000
    )
    c.optimizer.update(learning_rate=3e-4, warmup_steps=2000)


def moe_smoke(c):
    """smoke with 8 dropless top-2 experts spread over the expert axis (data=2 x expert=4)."""
    smoke(c)
    c.model.moe.update(experts=8, top_k=2, d_ff=128, shared_experts=0)
    c.mesh.update(data=2, fsdp=1, expert=4, tensor=1)


def long_smoke(c):
    """smoke on 1024-token sequences, each split over mesh.sequence=4 (x data=2). Other variants:
    --config.model.sequence_parallel=ulysses|usp|allgather; linear attention (LASP-2):
    --config.model.mixer=linear or hybrid."""
    smoke(c)
    c.model.update(max_seq_len=4096, sequence_parallel="ring")
    c.mesh.update(data=2, fsdp=1, sequence=4, tensor=1)
    c.train.update(global_batch=4, seq_len=1024)


def mixtral_8x7b(c):
    c.model.update(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        max_seq_len=32768,
        rope_theta=1e6,
        tie_embeddings=False,
        remat="full",
        param_dtype="float32",
        dtype="bfloat16",
    )
    c.model.moe.update(experts=8, top_k=2, d_ff=14336, router="softmax", capacity_factor=0.0)
    c.mesh.update(data=-1, fsdp=8, expert=8, tensor=1)
    c.data.update(source="tokens", path="/data/tokens/*.bin", token_dtype="uint16")
    c.train.update(
        steps=100000, global_batch=1024, seq_len=4096, log_every=50, eval_every=2000, checkpoint_every=1000
    )
    c.optimizer.update(learning_rate=3e-4, warmup_steps=2000)


def hf(c):
    """The architecture comes from model.hf_path's config.json (jaxpar.config.with_hf_architecture); what
    is set here is how it fine-tunes: a small learning rate, short warmup, the stdlib corpus tokenized with
    the checkpoint's tokenizer (set data.* for your own corpus)."""
    c.model.update(max_seq_len=4096)
    c.mesh.update(data=-1, fsdp=2, tensor=2)
    c.train.update(steps=100, global_batch=8, seq_len=256, log_every=10, eval_every=0, checkpoint_every=50)
    c.optimizer.update(learning_rate=2e-5, warmup_steps=10, weight_decay=0.0)


PRESETS = {
    "smoke": smoke,
    "small": small,
    "llama_1b": llama_1b,
    "llama_7b": llama_7b,
    "moe_smoke": moe_smoke,
    "long_smoke": long_smoke,
    "mixtral_8x7b": mixtral_8x7b,
    "hf": hf,
}


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r} in configs/lm.py; choose one of {sorted(PRESETS)}.")
    c = base()
    PRESETS[arg](c)
    c.lock()
    return c


def get_sweep(arg: str) -> list[dict]:
    """Sweeps over this file's configs: `python scripts/sweep.py --config=configs/lm.py:smoke --sweep=<arg>`.

    Each returns a list of override dicts (dotted keys); helpers in jaxpar.launch.sweep.
    """
    from jaxpar.launch.sweep import product, zip_

    sweeps = {
        "lr": lambda: product({"optimizer.learning_rate": [1e-3, 3e-3, 1e-2]}),
        "lr_x_seed": lambda: product({"optimizer.learning_rate": [1e-3, 3e-3]}, {"train.seed": [0, 1]}),
        "width": lambda: zip_({"model.d_model": [64, 128, 256], "model.d_ff": [192, 384, 768]}),
        "tiny": lambda: product({"optimizer.learning_rate": [1e-3, 3e-3]}),  # 2 points, for tests and demos
    }
    if arg not in sweeps:
        raise ValueError(f"unknown sweep {arg!r} in configs/lm.py; choose one of {sorted(sweeps)}.")
    return sweeps[arg]()
