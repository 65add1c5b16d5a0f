"""A Hugging Face model's whole life through jaxpar, against transformers: a tiny Llama with a byte-level BPE
tokenizer is fine-tuned from its directory (its loss falls), exported, and loaded by transformers with the
same logits and the same tokenizer; generating from the directory greedily gives transformers' tokens."""

import glob
import json
import os

import numpy as np
import pytest
import torch
import transformers
from infer_testing import full_logits

from configs import lm
from jaxpar.config import from_config_dict
from jaxpar.data.tokenizer import train_byte_bpe
from jaxpar.infer import harness, model as model_lib
from jaxpar.infer.engine import Engine, Request
from jaxpar.infer.export import export_workdir
from jaxpar.infer.sampling import SamplingParams
from jaxpar.train import loop
from run_testing import curve

VOCAB = 320


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny Llama and a BPE tokenizer (trained on a few stdlib files) in one HF directory."""
    directory = str(tmp_path_factory.mktemp("tiny_llama"))
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "json", "*.py")))
    texts = [open(f, encoding="utf-8").read() for f in files]
    train_byte_bpe(texts, VOCAB, directory, show_progress=False)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def finetuned(hf_dir, tmp_path_factory):
    """(workdir of the hf preset fine-tuning hf_dir for 8 steps, the run exported to an HF directory)."""
    config = lm.get_config("hf").to_dict()
    config["model"]["hf_path"] = hf_dir
    config["train"] |= dict(steps=8, global_batch=8, seq_len=32, log_every=1, checkpoint_every=8)
    config["optimizer"] |= dict(learning_rate=1e-2, warmup_steps=1)
    run = from_config_dict(config)
    assert run.data.tokenizer == hf_dir, "the checkpoint's tokenizer is the run's by default"
    root = tmp_path_factory.mktemp("finetuned")
    workdir, out = str(root / "run"), str(root / "exported")
    loop.train(run, workdir)
    summary = export_workdir(workdir, out)
    assert summary["model_type"] == "llama" and "tokenizer.json" in summary["files"]
    return workdir, out


def test_finetune_loss_falls_and_the_export_loads_in_transformers(finetuned):
    workdir, out = finetuned
    losses = [loss for loss, *_ in dict(sorted(curve(workdir).items())).values()]
    assert losses[-1] < losses[0] - 0.1, losses

    reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = model_lib.load_workdir(workdir, model_lib.inference_mesh())
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(full_logits(ours, tokens), expected, rtol=1e-5, atol=1e-5)

    text = "def dumps(obj, *, indent=None):\n    return obj"
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text) == ours.tokenizer.encode(text)
    with pytest.raises(FileExistsError, match="is not empty"):
        export_workdir(workdir, out)


TASKS = {
    "tiny_mc": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""",
    "tiny_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{question}}"
metric_list:
  - metric: word_perplexity
""",
    "tiny_gen": """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["="]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def local_tasks(folder) -> str:
    """Two lm-eval tasks over a local jsonl (no download): multiple choice and rolling loglikelihood."""
    rng = np.random.default_rng(1)
    words = ["json", "dumps", "loads", "indent", "return", "import", "class", "self", "def", "None"]
    data = folder / "docs.jsonl"
    with open(data, "w") as f:
        for _ in range(12):
            question = "import " + " ".join(rng.choice(words, 3)) + " ="
            choices = [" " + " ".join(rng.choice(words, 2)) for _ in range(4)]
            f.write(
                json.dumps({"question": question, "choices": choices, "answer": int(rng.integers(4))}) + "\n"
            )
    for task, body in TASKS.items():
        source = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (folder / f"{task}.yaml").write_text(f"task: {task}\n{source}{body}")
    return str(folder)


def test_lm_eval_through_jaxpar_equals_its_hf_backend(finetuned, tmp_path):
    """The run scored by jaxpar (batched on a data x tensor mesh) and its export scored by lm-eval's own
    hf backend (transformers): the same loglikelihood per request, the same greedy generations, the same
    metrics."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    workdir, out = finetuned
    include = local_tasks(tmp_path)
    ours = harness.evaluate(
        model_lib.load_workdir(workdir, model_lib.inference_mesh({"data": 2, "tensor": 2})),
        list(TASKS),
        include_path=include,
        batch_size=8,
        log_samples=True,
        bootstrap_iters=0,
    )
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": out, "dtype": "float32", "device": "cpu"},
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=include),
        batch_size=4,
        log_samples=True,
        bootstrap_iters=0,
    )
    for task in TASKS:
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        reference = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(mine) == len(reference) == 12
        if task == "tiny_gen":
            assert sum(bool(s["filtered_resps"][0]) for s in mine) >= 6, "most generations are not empty"
        for a, b in zip(mine, reference):
            assert a["arguments"] == b["arguments"]
            if task == "tiny_gen":  # greedy text, cut at the stop string, the same string
                assert a["filtered_resps"] == b["filtered_resps"], (task, a["doc_id"])
                continue
            got = np.array([r[0] if isinstance(r, (list, tuple)) else r for r in a["filtered_resps"]], float)
            want = np.array([r[0] if isinstance(r, (list, tuple)) else r for r in b["filtered_resps"]], float)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"{task} doc {a['doc_id']}")
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float) and not metric.endswith("stderr,none"):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric


def test_greedy_generation_from_the_directory_equals_transformers(hf_dir):
    model = model_lib.load_hf(hf_dir, model_lib.inference_mesh({"tensor": 2}))
    prompt = model.tokenizer.encode("import json\n")
    engine = Engine(model, slots=2, capacity=64, cache_dtype="float32")
    ours = engine.generate([Request(prompt, SamplingParams(max_tokens=12, temperature=0.0))])[0].token_ids
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=0, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert len(ours) > 1 and ours == (out[: out.index(0)] if 0 in out else out)  # both stop at id 0
