"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn): /v1/models, /v1/completions and
/v1/chat/completions (when the tokenizer has a chat template), streamed (server-sent events) or not.

The engine runs on one thread of its own (`EngineThread`); request handlers hand it requests through a
queue and receive its events on an asyncio queue each, so many clients share the engine's slots. A client
that disconnects cancels its request, which frees its slot before the next decode step. Bad requests get
a 4xx with an OpenAI-style error body ({"error": {"message", "type", "param", "code"}}) and the server
keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from jaxpar.infer.engine import Engine, Event, Request, RequestError
from jaxpar.infer.sampling import SamplingError, SamplingParams
from jaxpar.infer.text import apply_chat_template


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class EngineThread:
    """Runs `engine.step()` on a thread while it has work; sleeps on its inbox otherwise."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.thread = threading.Thread(target=self._run, name="jaxpar-engine", daemon=True)
        self.stopped = False
        self.thread.start()

    def submit(self, request: Request) -> asyncio.Queue:
        """Checks the request (RequestError now, in the caller) and queues it; its events arrive on the
        returned asyncio queue."""
        self.engine.check(request)
        events: asyncio.Queue = asyncio.Queue()
        self.inbox.put(("add", request, asyncio.get_running_loop(), events))
        return events

    def cancel(self, request_id: str) -> None:
        self.inbox.put(("cancel", request_id))

    def stop(self) -> None:
        self.stopped = True
        self.inbox.put(("stop",))
        self.thread.join()

    def _run(self) -> None:
        while not self.stopped:
            self._take(block=not self.engine.has_work)
            try:
                events = self.engine.step()
            except Exception as error:  # a failed step ends its requests, not the server
                events = [Event(rid, None, None, "", f"error: {error}") for rid in list(self.listeners)]
                self.engine.reset()
            for event in events:
                target = (
                    self.listeners.pop(event.request_id, None)
                    if event.finish_reason
                    else self.listeners.get(event.request_id)
                )
                if target is not None:
                    loop, events_queue = target
                    loop.call_soon_threadsafe(events_queue.put_nowait, event)

    def _take(self, block: bool) -> None:
        while True:
            try:
                item = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if item[0] == "add":
                _, request, loop, events_queue = item
                self.listeners[request.id] = (loop, events_queue)
                self.engine.add(request)
            elif item[0] == "cancel":
                self.engine.cancel(item[1])
            else:
                return


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields we do not use are accepted and ignored

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1


class CompletionBody(_Body):
    prompt: str | list[int]
    logprobs: int | None = None


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage]
    logprobs: bool = False


def _sampling(body: _Body, logprobs: bool, default_max_tokens: int) -> SamplingParams:
    if body.n != 1:
        raise ApiError(400, f"n={body.n}: this server returns one choice per request; send n=1", "n")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(
            max_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            min_p=body.min_p,
            seed=uuid.uuid4().int % 2**32 if body.seed is None else body.seed,
            stop=stop,
            logprobs=logprobs,
        )
    except SamplingError as error:
        raise ApiError(400, str(error), str(error).split("=")[0]) from None


def make_app(engine: Engine, default_max_tokens: int = 16) -> FastAPI:
    """The FastAPI app serving `engine`'s model; run it with uvicorn (scripts/serve.py)."""
    worker = EngineThread(engine)
    app = FastAPI(title="jaxpar", on_shutdown=[worker.stop])
    app.state.worker = worker
    model = engine.model
    tokenizer = model.tokenizer

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        body = {"message": error.message, "type": error.kind, "param": error.param, "code": None}
        return JSONResponse({"error": body}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"invalid request body: {where or 'body'}: {first.get('msg', 'malformed')}"
        return await api_error(None, ApiError(400, message, where or None))

    def check_model(name: str) -> None:
        if name != model.name:
            raise ApiError(
                404, f"model {name!r} does not exist; this server serves {model.name!r}", "model", "not_found"
            )

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model.name, "object": "model", "created": 0, "owned_by": "jaxpar"}],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        check_model(body.model)
        if isinstance(body.prompt, str):
            if tokenizer is None:
                raise ApiError(
                    400, "this model has no tokenizer: send the prompt as a list of token ids", "prompt"
                )
            prompt_ids = tokenizer.encode(body.prompt)
        else:
            prompt_ids = list(body.prompt)
        params = _sampling(body, body.logprobs is not None, default_max_tokens)
        return await _respond(
            worker, http, Request(prompt_ids, params), body.stream, "text_completion", model.name
        )

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HttpRequest):
        check_model(body.model)
        template = getattr(tokenizer, "chat_template", None)
        if template is None:
            raise ApiError(400, f"model {model.name!r} has no chat template; use /v1/completions", "messages")
        prompt = apply_chat_template(template, [m.model_dump() for m in body.messages])
        params = _sampling(body, body.logprobs, default_max_tokens)
        request = Request(tokenizer.encode(prompt), params)
        return await _respond(worker, http, request, body.stream, "chat.completion", model.name)

    return app


async def _respond(
    worker: EngineThread, http: HttpRequest, request: Request, stream: bool, kind: str, name: str
):
    try:
        events = worker.submit(request)
    except RequestError as error:
        raise ApiError(400, str(error), "prompt") from None
    meta = {
        "id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{request.id}",
        "created": int(time.time()),
        "model": name,
    }
    if stream:
        return StreamingResponse(_stream(worker, request, events, kind, meta), media_type="text/event-stream")
    while True:  # non-streaming: collect the events; a client gone before the end cancels the request
        try:
            event = await asyncio.wait_for(events.get(), timeout=1.0)
        except TimeoutError:
            if await http.is_disconnected():
                worker.cancel(request.id)
                raise ApiError(499, "client disconnected") from None
            continue
        if event.finish_reason:
            break
    return _final_body(event, request, kind, meta)


def _usage(result) -> dict[str, int]:
    prompt, completion = len(result.prompt_ids), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _final_body(event: Event, request: Request, kind: str, meta: dict) -> Any:
    if event.result is None:  # the engine failed or the request was cancelled
        raise ApiError(500, f"generation failed ({event.finish_reason})", kind="server_error")
    result = event.result
    logprobs = None
    if request.params.logprobs:
        logprobs = {"token_ids": result.token_ids, "token_logprobs": result.logprobs}
    if kind == "chat.completion":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": logprobs}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": logprobs, "token_ids": result.token_ids}
    choice["finish_reason"] = result.finish_reason
    return {**meta, "object": kind, "choices": [choice], "usage": _usage(result)}


async def _stream(worker: EngineThread, request: Request, events: asyncio.Queue, kind: str, meta: dict):
    """Server-sent events, one chunk per event; a disconnect (the generator closed) cancels the request."""
    chat = kind == "chat.completion"
    finished = False
    try:
        if chat:
            yield _sse(
                {
                    **meta,
                    "object": "chat.completion.chunk",
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    ],
                }
            )
        while not finished:
            event = await events.get()
            finished = bool(event.finish_reason)
            reason = event.finish_reason if event.result is not None or not finished else "error"
            if chat:
                choice = {
                    "index": 0,
                    "delta": {"content": event.text} if event.text else {},
                    "finish_reason": reason,
                }
                chunk = {**meta, "object": "chat.completion.chunk", "choices": [choice]}
            else:
                choice = {"index": 0, "text": event.text, "logprobs": None, "finish_reason": reason}
                if event.token_id is not None:
                    choice["token_ids"] = [event.token_id]
                    if request.params.logprobs:
                        choice["logprobs"] = {
                            "token_ids": [event.token_id],
                            "token_logprobs": [event.logprob],
                        }
                chunk = {**meta, "object": "text_completion", "choices": [choice]}
            if finished and event.result is not None:
                chunk["usage"] = _usage(event.result)
            yield _sse(chunk)
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            worker.cancel(request.id)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1"):
    """Serves `app` with uvicorn on a free port of `host` from a daemon thread (tests, benchmarks): returns
    (the uvicorn server, the thread, the API's base URL). Stop it with `server.should_exit = True` and a
    join of the thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))  # bound here and handed over: no other process can take the port in between
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server on {host} did not start")
        time.sleep(0.05)
    return server, thread, f"http://{host}:{sock.getsockname()[1]}/v1"
