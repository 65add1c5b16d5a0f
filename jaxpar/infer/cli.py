"""Flags and main functions behind experiments/generate.py and scripts/serve.py (the scripts stay thin).

Both load a model the same way (--workdir or --hf_path, --step, --mesh) and build the same engine (--slots,
--capacity, --prefill_chunk, --cache_dtype, --attention). Bad input (a workdir without a run, a mesh the
devices cannot hold, sampling values outside their meaning, a prompt too long) is one line on stderr and
exit code 1, before anything compiles.
"""

from __future__ import annotations

import json
import sys
import time

from absl import flags, logging
from tqdm import tqdm

from jaxpar.config import ConfigError
from jaxpar.infer import model as model_lib
from jaxpar.infer.engine import Engine, Request, RequestError
from jaxpar.infer.sampling import SamplingError, SamplingParams
from jaxpar.train import workdir as workdir_lib
from jaxpar.train.checkpoint import CheckpointError

FLAGS = flags.FLAGS
USER_ERRORS = (ConfigError, CheckpointError, RequestError, SamplingError, ValueError, OSError)


def define_model_flags() -> None:
    flags.DEFINE_string("workdir", None, "A training run's directory (config.json and checkpoints).")
    flags.DEFINE_string("hf_path", None, "Or a Hugging Face checkpoint directory (config.json, safetensors).")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest intact one).")
    flags.DEFINE_string("mesh", "", "Inference mesh, e.g. 'data=2,tensor=4' (default: one device).")
    flags.DEFINE_integer("slots", 8, "Sequences decoded together (continuous batching).")
    flags.DEFINE_integer("capacity", 0, "Tokens per sequence, prompt and completion (0: model.max_seq_len).")
    flags.DEFINE_integer("prefill_chunk", 128, "Longest prefill chunk (a power of two >= 16).")
    flags.DEFINE_enum("cache_dtype", "bfloat16", ["bfloat16", "float32"], "KV cache dtype.")
    flags.DEFINE_enum(
        "attention",
        None,
        ["auto", "xla", "pallas"],
        "KV-cache attention: Pallas decode/flash kernels or xla (default: the run's model.attention_impl; "
        "auto: pallas on GPU).",
    )
    flags.DEFINE_enum(
        "speculative",
        "none",
        ["none", "draft", "medusa"],
        "draft: speculative sampling with --draft_workdir; medusa: the run's own Medusa heads "
        "(model.medusa_heads) propose a candidate tree.",
    )
    flags.DEFINE_string("draft_workdir", None, "speculative=draft: a smaller run with the same vocabulary.")
    flags.DEFINE_integer("num_draft", 4, "speculative=draft: tokens the draft proposes per round.")
    flags.DEFINE_bool("adaptive_draft", False, "speculative=draft: choose 1..num_draft every round.")
    flags.DEFINE_integer("medusa_width", 2, "speculative=medusa: choices of each head per tree node.")
    flags.DEFINE_integer("medusa_candidates", 16, "speculative=medusa: most candidate tokens in the tree.")


def define_generate_flags() -> None:
    define_model_flags()
    flags.DEFINE_string("prompt", None, "One prompt (text; bytes for a byte-level run).")
    flags.DEFINE_string("prompts_file", None, "JSONL, one {'prompt': ...} or {'prompt_ids': [...]} per line.")
    flags.DEFINE_list("prompt_ids", None, "One prompt as token ids, e.g. 1,2,3.")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (at most).")
    flags.DEFINE_float("temperature", 1.0, "0: greedy.")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
    flags.DEFINE_float("min_p", 0.0, "Keep tokens at least min_p times as likely as the top one (0: off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed (per prompt: the same seed gives the same completion).")
    flags.DEFINE_multi_string("stop", [], "Stop string (repeatable); not part of the completion.")
    flags.DEFINE_bool("logprobs", False, "Write each generated token's log-probability to --output.")
    flags.DEFINE_string("output", None, "JSONL with prompt, completion, token_ids, finish_reason per prompt.")


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(
                f"--mesh={text!r}: {part!r} must be AXIS=SIZE with SIZE >= 1, e.g. data=2,tensor=4"
            )
        sizes[name.strip()] = int(value)
    return sizes


def load_engine(f) -> Engine:
    if (f.speculative == "draft") != (f.draft_workdir is not None):
        raise ConfigError("--speculative=draft and --draft_workdir go together: give both or neither")
    mesh = model_lib.inference_mesh(parse_mesh(f.mesh))
    model = model_lib.load(f.workdir, f.hf_path, mesh, f.step)
    draft = None if f.draft_workdir is None else model_lib.load_workdir(f.draft_workdir, mesh)
    return Engine(
        model,
        slots=f.slots,
        capacity=f.capacity or None,
        prefill_chunk=f.prefill_chunk,
        cache_dtype=f.cache_dtype,
        attention=f.attention,
        draft=draft,
        num_draft=f.num_draft,
        adaptive_draft=f.adaptive_draft,
        medusa_width=f.medusa_width if f.speculative == "medusa" else 0,
        medusa_candidates=f.medusa_candidates,
    )


def _requests(f, tokenizer) -> list[tuple[str | list[int], Request]]:
    """(prompt as given, request) per prompt, from exactly one of --prompt, --prompt_ids, --prompts_file."""
    given = [name for name in ("prompt", "prompt_ids", "prompts_file") if getattr(f, name) is not None]
    if len(given) != 1:
        raise ConfigError(
            f"give exactly one of --prompt, --prompt_ids, --prompts_file (got {given or 'none'})"
        )
    lines = [{"prompt": f.prompt}] if f.prompt is not None else [{"prompt_ids": f.prompt_ids}]
    if f.prompts_file is not None:
        with open(f.prompts_file) as file:
            lines = []
            for number, line in enumerate(file, 1):
                if line.strip():
                    try:
                        lines.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ConfigError(f"{f.prompts_file}:{number} is not JSON ({error.msg})") from None
    out = []
    for number, line in enumerate(lines, 1):
        where = f"{f.prompts_file}:{number}" if f.prompts_file else "the prompt"
        if not isinstance(line, dict) or ("prompt" in line) == ("prompt_ids" in line):
            raise ConfigError(f"{where}: give one of 'prompt' (text) or 'prompt_ids' (a list of ids)")
        if "prompt" in line:
            if tokenizer is None:
                raise ConfigError(f"{where}: this run has no tokenizer (data.source tokens); give prompt ids")
            prompt, ids = line["prompt"], tokenizer.encode(line["prompt"])
        else:
            try:
                prompt = ids = [int(i) for i in line["prompt_ids"]]
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{where}: prompt_ids must be integers, got {line['prompt_ids']!r}"
                ) from None
        params = SamplingParams(
            max_tokens=line.get("max_new_tokens", f.max_new_tokens),
            temperature=line.get("temperature", f.temperature),
            top_k=line.get("top_k", f.top_k),
            top_p=line.get("top_p", f.top_p),
            min_p=line.get("min_p", f.min_p),
            seed=line.get("seed", f.seed),
            stop=tuple(f.stop),
            logprobs=f.logprobs,
        )
        out.append((prompt, Request(ids, params)))
    return out


def generate_main(f) -> int:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    try:  # the prompts and sampling values are checked before the weights load
        if f.workdir is not None:  # prompts checked before the weights load
            prompts = _requests(f, model_lib.tokenizer_for(workdir_lib.read_run_config(f.workdir), f.workdir))
        engine = load_engine(f)
        if f.workdir is None:
            prompts = _requests(f, engine.model.tokenizer)
        for _, request in prompts:
            engine.check(request)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    requests = [request for _, request in prompts]
    start = time.perf_counter()
    if len(requests) == 1:
        text = prompts[0][0] if isinstance(prompts[0][0], str) else ""
        print(text, end="", flush=True)
        on_event = lambda event: print(event.text, end="", flush=True)
        results = engine.generate(requests, on_event)
        print()
    else:
        bar = tqdm(total=len(requests), unit="prompt", desc="generate")
        number = {request.id: i for i, request in enumerate(requests)}

        def on_event(event):
            if event.result is not None:
                bar.update(1)
                bar.write(f"[{number[event.request_id]}] {event.result.text!r}")

        results = engine.generate(requests, on_event)
        bar.close()
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    print(
        f"{len(results)} completion(s), {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.1f} tok/s, "
        f"compile included; {engine.compiled_programs()} programs compiled) from {engine.model.name}",
        file=sys.stderr,
    )
    if hasattr(engine.decoder, "tokens_per_forward"):  # Medusa
        print(
            f"{engine.decoder.tokens_per_forward():.2f} tokens per target forward per sequence",
            file=sys.stderr,
        )
    if f.output:
        with open(f.output, "w") as out:
            for (prompt, _), result in zip(prompts, results):
                line = {
                    "prompt": prompt,
                    "completion": result.text,
                    "token_ids": result.token_ids,
                    "finish_reason": result.finish_reason,
                }
                if f.logprobs:
                    line["logprobs"] = result.logprobs
                out.write(json.dumps(line) + "\n")
    return 0


def define_serve_flags() -> None:
    define_model_flags()
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    flags.DEFINE_integer("port", 8000, "Port.")
    flags.DEFINE_integer(
        "default_max_tokens", 16, "max_tokens of a request that sets none (OpenAI's default)."
    )


def serve_main(f) -> int:
    import uvicorn  # the server's stack loads only when serving

    from jaxpar.infer.server import make_app

    logging.set_verbosity(logging.WARNING)
    try:
        engine = load_engine(f)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"serving {engine.model.name} on http://{f.host}:{f.port}/v1 ({engine.slots} slots of "
        f"{engine.capacity} tokens, KV cache {engine.cache_bytes / 2**20:.1f} MiB)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(make_app(engine, f.default_max_tokens), host=f.host, port=f.port, log_level="warning")
    return 0
