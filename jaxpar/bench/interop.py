"""Importing a Hugging Face checkpoint onto 8 simulated CPU devices (fsdp=8): jaxpar's shard-by-shard reader
(jaxpar.interop.hf_weights: every device's shard read on its own from the memory-mapped safetensors) against
what a user would otherwise write: `transformers.AutoModelForCausalLM.from_pretrained` (bf16), each jaxpar
parameter assembled whole in numpy from the torch tensors, then a plain `jax.device_put` into the same
shardings.

Random bf16 checkpoints of Llama shapes are made locally (~0.1B to ~1.2B parameters). Each load runs in a
fresh child process that reports the seconds until every array is ready and its peak resident memory
(ru_maxrss) above what it held just before loading; the contenders alternate, jaxpar first, then the
baseline, per size and repeat, in one run. On simulated CPU devices every device's memory is host memory,
so the final arrays themselves (one copy of the model under fsdp=8) count in both contenders' RSS.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import sys
import time

import numpy as np

from jaxpar.bench import common

DEVICES = 8
MESH = {"fsdp": 8}
SIZES = {  # Llama shapes: (hidden, layers, intermediate, heads, kv heads, vocab), tied embeddings
    "0.1B": (768, 12, 2048, 12, 4, 32000),
    "0.4B": (1024, 24, 4096, 16, 8, 32000),
    "1.2B": (2048, 16, 8192, 32, 8, 128256),  # Llama-3.2-1B
}
CHILD = "jaxpar.bench.interop"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _anon_bytes() -> int:
    """Resident anonymous memory (not file pages: safetensors' memory maps are file pages the kernel can
    drop, so they count in RSS but are not memory the load holds)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class _AnonPeak:
    """Samples _anon_bytes every millisecond on a thread while in the `with` block; .peak is the largest."""

    def __enter__(self):
        import threading

        self.peak, self._done = _anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _anon_bytes())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_bytes())


def _model_config(size: str):
    from jaxpar.config import ModelConfig

    hidden, layers, inter, heads, kv, vocab = SIZES[size]
    return ModelConfig(
        vocab_size=vocab,
        d_model=hidden,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=hidden // heads,
        d_ff=inter,
        tie_embeddings=True,
        param_dtype="bfloat16",
        max_seq_len=4096,
    )


def make_checkpoint(size: str, directory: str) -> dict:
    """A random bf16 HF checkpoint of `size` in `directory` (config.json, 1 GiB shards, index)."""
    import json

    import ml_dtypes
    from safetensors.numpy import save_file

    from jaxpar.interop import hf_config, hf_weights

    cfg = _model_config(size)
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    shard, shards, names, nbytes = {}, [], {}, 0
    for spec in hf_weights.tensor_map(cfg).values():
        for _, name in spec.names((cfg.n_layers,) * spec.stacked):
            tensor = (0.02 * rng.standard_normal(spec.hf_shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
            shard[name] = tensor
            nbytes += tensor.nbytes
            if sum(t.nbytes for t in shard.values()) > 2**30:
                shards.append(shard)
                shard = {}
    shards.append(shard)
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        names |= {name: file for name in tensors}
    with open(os.path.join(directory, hf_weights.INDEX), "w") as f:
        json.dump({"metadata": {"total_size": nbytes}, "weight_map": names}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config.hf_config(cfg, dtype="bfloat16"), f)
    return {"params": cfg.n_params, "bytes": nbytes}


def _measure(mode: str, directory: str) -> dict:
    """Child: load `directory` the `mode` way onto the fsdp=8 mesh; seconds, peak RSS above the start."""
    import jax
    from flax import nnx

    from jaxpar.config import from_config_dict
    from jaxpar.infer.model import inference_mesh
    from jaxpar.train import build as build_lib

    if mode == "transformers":
        import torch  # noqa: F401  (imported before the start mark: a user of this path has it loaded)
        import transformers  # noqa: F401
    cfg = from_config_dict({"model": {"hf_path": directory, "param_dtype": "bfloat16"}}).model
    mesh = inference_mesh(MESH)
    _, abstract, shardings = build_lib.param_shardings(cfg, mesh)
    start_rss, start_anon, start = _rss_bytes(), _anon_bytes(), time.perf_counter()
    with _AnonPeak() as anon:
        if mode == "jaxpar":
            arrays = build_lib.load_hf_params(cfg, mesh)
        else:
            arrays = _transformers_then_device_put(directory, cfg, nnx.to_pure_dict(shardings))
        jax.block_until_ready(arrays)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    leaves = jax.tree.leaves(arrays)
    on_device0 = sum(
        s.data.nbytes for a in leaves for s in a.addressable_shards if s.device == mesh.devices.flat[0]
    )
    return {
        "seconds": seconds,
        "peak_rss_above_start": peak - start_rss,
        "peak_anon_above_start": anon.peak - start_anon,
        "final_bytes": sum(a.nbytes for a in leaves),
        "device0_bytes": on_device0,
    }


def _transformers_then_device_put(directory: str, cfg, shardings: dict) -> dict:
    """The baseline: from_pretrained, then every jaxpar parameter stacked whole in numpy, then device_put."""
    import jax
    import ml_dtypes
    import torch
    import transformers

    from jaxpar.interop import hf_weights

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    tensors = dict(model.state_dict())
    flat_shardings = hf_weights.flatten(shardings)

    def numpy(name):
        return tensors[name].view(torch.int16).numpy().view(ml_dtypes.bfloat16)

    out = {}
    for path, spec in hf_weights.tensor_map(cfg).items():
        whole = [
            spec.read(_Whole(numpy(name)), name, tuple(slice(0, n) for n in _core_shape(spec)))
            for _, name in spec.names((cfg.n_layers,) * spec.stacked)
        ]
        array = np.stack(whole) if spec.stacked else whole[0]
        out[path] = jax.device_put(array, flat_shardings[path])
    return hf_weights.unflatten(out)


class _Whole:
    """A numpy array behind safetensors' get_slice(name)[index] interface."""

    def __init__(self, array):
        self.array = array

    def get_slice(self, name):
        return self.array


def _core_shape(spec) -> tuple[int, ...]:
    return tuple(n for hf_axis in spec.order for n in spec.groups[hf_axis])


def run(out: str, sizes: list[str], repeats: int, scratch: str) -> dict:
    import jax
    import torch
    import transformers

    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "devices": f"{DEVICES} simulated CPU devices, mesh {MESH}",
        },
        "versions": {
            "python": sys.version.split()[0],
            "jax": jax.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "sizes": {},
    }
    for size in sizes:
        directory = os.path.join(scratch, size)
        made = make_checkpoint(size, directory)
        rows = {"jaxpar": [], "transformers": []}
        for _ in range(repeats):
            for mode in ("jaxpar", "transformers"):
                rows[mode].append(common.run_in_child(CHILD, [mode, directory], DEVICES))
                print(size, mode, rows[mode][-1], flush=True)
        shutil.rmtree(directory)
        results["sizes"][size] = {**made, **rows}
    results["load_average_at_end"] = os.getloadavg()
    common.write_results(out, results)
    render(out)
    return results


def _best(rows, key):
    return min(row[key] for row in rows)


def render(out: str) -> None:
    results = common.read_results(out)
    gib = 2**30
    lines = [
        "# Importing a Hugging Face checkpoint (bf16) onto 8 simulated CPU devices, fsdp=8",
        "",
        "jaxpar: `build.load_hf_params` (each device's shard read on its own from the memory-mapped "
        "safetensors). Baseline: `transformers.AutoModelForCausalLM.from_pretrained(dtype=bfloat16)`, each "
        "parameter stacked whole in numpy, `jax.device_put` into the same shardings. Each load in a fresh "
        "process, contenders alternating in one run; best of the repeats. Peak memory is the largest "
        "resident anonymous memory (RssAnon, sampled every millisecond) above what the process held just "
        "before the load: the memory-mapped checkpoint's file pages are left out (results.json also has "
        "ru_maxrss, which counts them). The final arrays (one copy of the model, all devices' memory being "
        "host memory here) are part of it for both.",
        "",
        "| model | params | checkpoint GiB | per-device GiB | jaxpar s | transformers s | time ratio "
        "| jaxpar peak GiB | transformers peak GiB | peak ratio "
        "| beyond the final arrays: jaxpar / transformers GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, row in results["sizes"].items():
        ours_s, theirs_s = _best(row["jaxpar"], "seconds"), _best(row["transformers"], "seconds")
        ours_m = _best(row["jaxpar"], "peak_anon_above_start")
        theirs_m = _best(row["transformers"], "peak_anon_above_start")
        lines.append(
            f"| {size} | {row['params'] / 1e9:.2f} B | {row['bytes'] / gib:.2f} | "
            f"{row['jaxpar'][0]['device0_bytes'] / gib:.3f} | {ours_s:.1f} | {theirs_s:.1f} | "
            f"{theirs_s / ours_s:.2f}x faster | {ours_m / gib:.2f} | {theirs_m / gib:.2f} | "
            f"{theirs_m / ours_m:.2f}x less | {(ours_m - row['jaxpar'][0]['final_bytes']) / gib:.2f} / "
            f"{(theirs_m - row['transformers'][0]['final_bytes']) / gib:.2f} |"
        )
    machine, versions = results["machine"], results["versions"]
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['devices']}; load average "
        f"{', '.join(f'{x:.1f}' for x in machine['load_average_at_start'])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in results['load_average_at_end'])} at the end (other work ran "
        "beside it). Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "Reproduce: `python experiments/bench_interop.py --out=benchmarks/interop`.",
    ]
    common.write_readme(out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    common.child_main(_measure)
