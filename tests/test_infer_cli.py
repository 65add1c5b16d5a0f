"""The entry points as a user runs them: experiments/generate.py on a trained byte-level run (text and id
prompts, a prompts file, JSONL output, bad input), and scripts/serve.py answering over HTTP, stopped by
its PID."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from infer_testing import greedy_reference
from test_checkpoint_faults import tiny_run

from jaxpar.infer import model as model_lib
from jaxpar.launch.local import free_port
from jaxpar.train import loop
from run_testing import ENV, ROOT

GENERATE = [sys.executable, os.path.join(ROOT, "experiments", "generate.py")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A byte-level run of 4 steps (the stdlib corpus), checkpointed at its end."""
    workdir = tmp_path_factory.mktemp("run")
    loop.train(tiny_run(steps=4, checkpoint_every=0), str(workdir))
    return workdir


def generate(*args):
    return subprocess.run([*GENERATE, *args], capture_output=True, text=True, env=ENV, timeout=300)


def test_generate_writes_greedy_completions(workdir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "def "})
        + "\n"
        + json.dumps({"prompt_ids": [105, 109], "max_new_tokens": 3})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    done = generate(
        f"--workdir={workdir}",
        f"--prompts_file={prompts}",
        "--max_new_tokens=5",
        "--temperature=0",
        f"--output={out}",
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    model = model_lib.load_workdir(str(workdir), model_lib.inference_mesh())
    assert lines[0]["prompt"] == "def " and lines[0]["token_ids"] == greedy_reference(model, list(b"def "), 5)
    assert lines[0]["completion"] == bytes(lines[0]["token_ids"]).decode("utf-8", errors="replace")
    assert lines[1]["token_ids"] == greedy_reference(model, [105, 109], 3)
    assert "2 programs compiled" in done.stderr  # one decode step, one prefill bucket (16)


def test_one_prompt_streams_to_the_terminal(workdir):
    done = generate(f"--workdir={workdir}", "--prompt=import ", "--max_new_tokens=4", "--seed=1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("import ") and "1 completion(s), 4 tokens" in done.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["--workdir=/nonexistent", "--prompt=a"], "/nonexistent/config.json does not exist"),
        (["--prompt=a", "--temperature=-2"], "temperature=-2.0 must be"),
        (["--prompt=a", "--prompt_ids=1"], "give exactly one of --prompt, --prompt_ids, --prompts_file"),
        (["--prompt=a", "--mesh=tensor=16"], "needs 16 devices"),
        (["--prompt_ids=1,999"], "token id 999 is outside the vocabulary"),
        (["--prompt=a", "--speculative=draft"], "--speculative=draft and --draft_workdir go together"),
    ],
)
def test_bad_input_is_one_line(workdir, args, words):
    if not any(a.startswith("--workdir") for a in args):
        args = [f"--workdir={workdir}", *args]
    done = generate(*args)
    assert done.returncode == 1 and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0


def test_serve_answers_and_stops_on_sigterm(workdir):
    port = free_port()
    command = [
        sys.executable,
        os.path.join(ROOT, "scripts", "serve.py"),
        f"--workdir={workdir}",
        f"--port={port}",
    ]
    server = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, models = time.time() + 120, None
        while time.time() < deadline and models is None:
            assert server.poll() is None, server.communicate()[1]
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
            except httpx.ConnectError:
                time.sleep(0.2)
        name = models["data"][0]["id"]
        assert name == f"{os.path.basename(workdir)}@4"
        body = {"model": name, "prompt": "x", "max_tokens": 3, "temperature": 0}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120).json()
        assert answer["usage"]["completion_tokens"] == 3
    finally:
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -SIGTERM).
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.stderr.read()


def test_speculative_generation_equals_plain_greedy(workdir, tmp_path):
    """The run drafts for itself (every proposal accepted): the same greedy tokens as plain decoding."""
    out = tmp_path / "out.jsonl"
    done = generate(
        f"--workdir={workdir}",
        "--prompt_ids=105,109",
        "--max_new_tokens=6",
        "--temperature=0",
        "--speculative=draft",
        f"--draft_workdir={workdir}",
        "--num_draft=3",
        f"--output={out}",
    )
    assert done.returncode == 0, done.stderr
    model = model_lib.load_workdir(str(workdir), model_lib.inference_mesh())
    assert json.loads(out.read_text())["token_ids"] == greedy_reference(model, [105, 109], 6)
