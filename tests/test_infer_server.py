"""The OpenAI-compatible server, started on 127.0.0.1 inside the test (uvicorn on a thread) and driven by
the real `openai` client: completions, streaming, chat, concurrent clients, bad requests, a client that
disconnects mid-stream."""

import concurrent.futures
import dataclasses
import time

import httpx
import openai
import pytest
from infer_testing import MODELS, greedy_reference, loaded

from jaxpar.infer.engine import Engine
from jaxpar.infer.server import make_app, serve_in_thread
from jaxpar.infer.text import ByteTokenizer

BYTE_MODEL = dataclasses.replace(MODELS["dense"], vocab_size=256)
CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


class ChatBytes(ByteTokenizer):
    chat_template = CHAT_TEMPLATE


def text_of(ids) -> str:
    return ByteTokenizer().decode(ids)


def serve(model, slots=2):
    engine = Engine(model, slots=slots, capacity=48, cache_dtype="float32", attention="xla")
    server, thread, url = serve_in_thread(make_app(engine))
    return server, thread, engine, url


@pytest.fixture(scope="module")
def byte_server():
    """A byte-level model with a chat template (vocab 256: prompts are text)."""
    model = loaded(BYTE_MODEL, tokenizer=ChatBytes())
    server, thread, engine, url = serve(model)
    yield model, engine, url, openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    server.should_exit = True
    thread.join(timeout=30)


def test_models_and_a_greedy_completion(byte_server):
    model, _, _, client = byte_server
    assert [m.id for m in client.models.list().data] == [model.name]
    done = client.completions.create(model=model.name, prompt="abc", max_tokens=5, temperature=0)
    assert done.choices[0].text == text_of(greedy_reference(model, list(b"abc"), 5))
    assert done.usage.prompt_tokens == 3 and done.usage.completion_tokens == 5
    assert done.choices[0].finish_reason == "length"


def test_streaming_gives_the_same_text_as_one_response(byte_server):
    model, _, _, client = byte_server
    args = dict(model=model.name, prompt="hello", max_tokens=8, temperature=0.9, seed=3)
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_uses_the_template(byte_server):
    model, _, _, client = byte_server
    messages = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model=model.name, messages=messages, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content == text_of(
        greedy_reference(model, list(b"user: hi\nassistant:"), 4)
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len("user: hi\nassistant:") and reply.usage.completion_tokens == 4
    streamed = client.chat.completions.create(
        model=model.name, messages=messages, max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content


def test_concurrent_clients_share_the_slots(byte_server):
    """Six clients on two slots: every one gets its own greedy completion."""
    model, _, _, client = byte_server
    prompts = [f"p{i}" for i in range(6)]

    def ask(prompt):
        return client.completions.create(
            model=model.name, prompt=prompt, max_tokens=4, temperature=0
        ).choices[0]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, prompts))
    for prompt, answer in zip(prompts, answers):
        assert answer.text == text_of(greedy_reference(model, list(prompt.encode()), 4))


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"model": "nope", "prompt": "a"}, 404, "model 'nope' does not exist"),
        ({"prompt": "a" * 60}, 400, "60 tokens"),
        ({"prompt": "a", "temperature": -1}, 400, "temperature=-1"),
        ({"prompt": "a", "top_p": 0}, 400, "top_p=0"),
        ({"prompt": "a", "n": 2}, 400, "n=2"),
        ({"prompt": 5}, 400, "prompt"),
    ],
)
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(byte_server, body, status, words):
    model, _, url, client = byte_server
    response = httpx.post(f"{url}/completions", json={"model": model.name, **body}, timeout=30)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]
    assert (
        client.completions.create(model=model.name, prompt="a", max_tokens=1).choices[0].finish_reason
        == "length"
    )


def test_malformed_json_is_a_400(byte_server):
    _, _, url, _ = byte_server
    response = httpx.post(
        f"{url}/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and "invalid request body" in response.json()["error"]["message"]


def test_chat_without_a_template_is_a_400():
    model = loaded(BYTE_MODEL, tokenizer=ByteTokenizer())
    server, thread, _, url = serve(model)
    try:
        response = httpx.post(
            f"{url}/chat/completions",
            json={"model": model.name, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 400 and "no chat template" in response.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(byte_server, monkeypatch):
    model, engine, url, client = byte_server
    step, reasons = engine.step, []

    def slow_step():  # 50 ms per decode step: the 40 tokens cannot all come before the hang-up lands
        time.sleep(0.05)
        events = step()
        reasons.extend(e.finish_reason for e in events if e.finish_reason)
        return events

    monkeypatch.setattr(engine, "step", slow_step)
    body = {"model": model.name, "prompt": "x", "max_tokens": 40, "stream": True}
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    deadline = time.time() + 20
    while time.time() < deadline and not reasons:
        time.sleep(0.05)
    assert reasons == ["cancelled"] and all(a is None for a in engine._active)
    monkeypatch.undo()
    assert client.completions.create(model=model.name, prompt="a", max_tokens=2).usage.completion_tokens == 2
