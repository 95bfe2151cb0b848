"""OpenAI-compatible HTTP API over the serving engine: many adapters on one base model.

`model` in a request names the base, an adapter, a composition ("a+b", "a:0.7+b:0.3") or
"auto" (the language router). Errors always have OpenAI's shape
{"error": {"message", "type", "param", "code"}}; see docs/serving.md for the status codes.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loratune.config.commands import ServeConfig, UiConfig
from loratune.data.errors import DataError
from loratune.data.templates import adapters_template
from loratune.data.tools import tool_conversation
from loratune.http_guard import HostPolicy, RequestGuard
from loratune.serve.image_prompt import ImageError, ImagePrompt, ImageSource, request_images
from loratune.serve.prometheus import Metrics
from loratune.serve.router import LanguageRouter, last_user_text
from loratune.serve.sampling import SEED_MAX, SEED_MIN
from loratune.serve.tool_constraint import CallReader, force_call
from loratune.data.tool_calls import PARSERS, parse_tool_calls, parser_for_template
from loratune.serve.types import (BadAdapter, Event, GenerationRequest, SamplingParams,
                                  ServeError, UnknownAdapter)

# The engine enforces each request's timeout itself; this margin is only a safety net for an
# engine that stopped answering, so a client never waits forever.
DEADLINE_GRACE_S = 5.0
DEFAULT_MAX_TOKENS = 256     # when a request sets neither max_tokens nor max_completion_tokens
DEFAULT_MAX_BODY_BYTES = ServeConfig.model_fields["max_body_bytes"].default


class APIError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.param, self.headers = param, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_SERVE_ERROR_KINDS = {
    400: ("invalid_request_error", "invalid_value"),
    404: ("invalid_request_error", "model_not_found"),
    422: ("invalid_request_error", "bad_adapter"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


# What the Host/Origin/content-type guard (http_guard) refuses, in OpenAI's terms.
_GUARD_ERROR_KINDS = {
    421: ("invalid_request_error", "host_not_allowed"),
    403: ("permission_error", "cross_origin_refused"),
    415: ("invalid_request_error", "unsupported_content_type"),
}


def guard_error_body(status: int, message: str) -> dict:
    type_, code = _GUARD_ERROR_KINDS.get(status, ("invalid_request_error", None))
    return APIError(status, message, type_, code).body()


def status_error(status: int, message: str, param: str | None = None) -> APIError:
    """An engine refusal (a ServeError's status and message) in OpenAI's terms."""
    type_, code = _SERVE_ERROR_KINDS.get(status, ("invalid_request_error", None))
    headers = {"Retry-After": "1"} if status == 429 else None
    return APIError(status, message, type_, code, param=param, headers=headers)


def from_serve_error(err: ServeError) -> APIError:
    return status_error(err.status, str(err), err.param)


# -- request bodies -------------------------------------------------------------------------------
class _Body(BaseModel):
    """Fields both generation endpoints share; unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)          # extension: OpenAI has no top_k
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = 1
    logprobs: Any = None
    user: str | None = None                         # accepted and ignored

    def sampling(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_tokens is None else self.max_tokens
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop: stop strings must not be empty", param="stop")
        if self.n not in (None, 1):
            raise APIError(400, f"n: only n=1 is supported, got {self.n}", param="n")
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs: not supported by this server", param="logprobs")
        return SamplingParams(
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,  # OpenAI default
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, seed=self.seed, stop=stop)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class _ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(min_length=1)


class _ImagePart(BaseModel):
    """OpenAI's image part: a data: URL, a path under --image-root, or (allowed) http(s)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: _ImageUrl


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart | _ImagePart] | None = None
    tool_calls: list | None = None
    tool_call_id: str | None = None

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) else \
            "".join(p.text for p in self.content or [] if p.type == "text")
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        out = {"role": "system" if self.role == "developer" else self.role, "content": content}
        out.update({k: v for k, v in (("tool_calls", self.tool_calls),
                                      ("tool_call_id", self.tool_call_id)) if v})
        return out


class ChatBody(_Body):
    messages: list[_Message]
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    def tools_on(self) -> bool:
        """Whether the answer may be tool calls (tools given, tool_choice not "none")."""
        self.forced_names()          # a bad tool_choice is a 400 whatever else the body holds
        return bool(self.tools) and self.tool_choice != "none"

    def forced_names(self) -> list[str] | None:
        """The names a forced call may take: every declared tool for "required", the one a
        named choice gives; None when the model is free ("auto", "none", unset)."""
        choice = self.tool_choice
        if choice in (None, "auto", "none"):
            return None
        declared = [(t.get("function") or {}).get("name") for t in self.tools or []
                    if isinstance(t, dict)]
        if choice == "required":
            if not declared:
                raise APIError(400, "tool_choice: 'required' needs tools to call",
                               param="tool_choice")
            return declared
        name = named_choice(choice)
        if name is None:
            raise APIError(400, "tool_choice: expected 'auto', 'none', 'required' or "
                           '{"type": "function", "function": {"name": ...}}, got '
                           f"{choice!r}", param="tool_choice")
        if name not in declared:
            raise APIError(400, f"tool_choice: {name!r} is not a function in tools (declared: "
                           f"{', '.join(map(str, declared)) or 'none'})", param="tool_choice")
        return [name]


def named_choice(choice) -> str | None:
    """The function name of a {"type": "function", "function": {"name": ...}} tool_choice."""
    if not (isinstance(choice, dict) and choice.get("type") == "function"
            and isinstance(choice.get("function"), dict)):
        return None
    name = choice["function"].get("name")
    return name if isinstance(name, str) else None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    echo: bool | None = False
    suffix: str | None = None


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    path: str | None = None


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with a 413 past `limit` bytes: counted as it arrives, so a chunked
    upload without a Content-Length is cut off too, not read into memory first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes, this server's limit "
                    "(--max-body-bytes)", code="request_too_large")


async def parse_body(request: Request, cls: type[BaseModel], limit: int) -> BaseModel:
    """Read and validate a JSON body; a 413 past `limit` bytes, a 400 names the first bad field.

    Parsing a large body takes a while: it runs on a worker thread, not on the event loop.
    """
    raw = await read_body(request, limit)
    return await asyncio.to_thread(validate_body, raw, cls)


def validate_body(raw: bytes, cls: type[BaseModel]) -> BaseModel:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json")
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON here: it nests arrays or "
                       "objects too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object, got "
                       f"{type(data).__name__ if data is not None else 'null'}",
                       code="invalid_json")
    check_text(data)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"{field}: {first['msg']}", code="invalid_value", param=field)


def check_text(data: Any) -> None:
    """Refuse strings that are not Unicode text: JSON's "\\ud800" escape parses to a lone
    surrogate, which no tokenizer takes (it would be a 500 deep inside it)."""
    todo = [("body", data)]
    while todo:             # a loop, not recursion: the body may nest ~1000 levels deep
        where, value = todo.pop()
        if isinstance(value, dict):
            todo.extend((f"{k}" if where == "body" else f"{where}.{k}", v)
                        for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((f"{where}.{i}", v) for i, v in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise APIError(400, f"{where}: not Unicode text ({err.reason} at character "
                               f"{err.start})", code="invalid_value", param=where) from None


# -- prompts --------------------------------------------------------------------------------------
def chat_prompt_ids(tokenizer, body: ChatBody, template: str | None = None) -> list[int]:
    """Messages → token ids with the chat template (as eval/generate.py does): `template`'s
    text (the served adapters' stored one), else the tokenizer's own."""
    from loratune.eval.generate import prompt_ids

    if not body.messages:
        raise APIError(400, "messages: must contain at least one message", param="messages")
    messages, tools = [m.plain() for m in body.messages], None
    if body.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        messages, tools = request_tools(body, messages)
    try:
        return prompt_ids(tokenizer, messages, tools=tools if body.tools_on() else None,
                          template_text=template)
    except APIError:
        raise
    except Exception as err:  # jinja raises plain exceptions for what a template refuses
        raise APIError(400, f"messages: the chat template refused them: {err}", param="messages")


def request_tools(body: ChatBody, messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """The request's messages and tools read as training reads them (data/tools.py): calls of
    declared tools with JSON arguments, results answering a call; else a 400 naming it."""
    try:
        return tool_conversation({"tools": body.tools or [], "messages": messages}, "messages",
                                 "request", answer_last=False)
    except DataError as err:
        raise APIError(400, str(err), param="messages") from None


def completion_prompt_ids(tokenizer, body: CompletionBody) -> list[int]:
    """A prompt string (or one-string list, or token ids) → token ids, special tokens added."""
    if body.echo or body.suffix:
        raise APIError(400, "echo and suffix are not supported by this server", param="echo")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: one prompt per request, got a list of {len(prompt)}",
                           param="prompt")
        prompt = prompt[0]
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


# -- responses ------------------------------------------------------------------------------------
def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(last: Event, prompt_len: int) -> dict:
    prompt = last.prompt_tokens or prompt_len
    return {"prompt_tokens": prompt, "completion_tokens": last.completion_tokens,
            "total_tokens": prompt + last.completion_tokens}


def _failure(last: Event | None) -> APIError | None:
    """The error a final event stands for, or None when it finished normally."""
    reason = last.finish_reason if last is not None else "timeout"
    if reason in ("stop", "length"):
        return None
    if reason == "error" and last.status is not None and last.status < 500:
        return status_error(last.status, last.error or "the request was refused")
    if reason == "timeout":
        return APIError(504, "the request did not finish within the server's time limit "
                        "(--request-timeout)", "timeout_error", "timeout")
    if reason == "cancelled":
        return APIError(503, "the request was cancelled by the server (shutting down?)",
                        "server_error", "cancelled")
    return APIError(500, f"generation failed: {last.error or reason}", "server_error")


class _Call:
    """One generation request in flight: what it asked, its handle and its timing."""

    def __init__(self, kind: str, model: str, handle, prompt_len: int, started: float,
                 timeout_s: float):
        self.kind, self.model, self.handle, self.prompt_len = kind, model, handle, prompt_len
        self.started = started
        self.deadline = asyncio.get_running_loop().time() + timeout_s + DEADLINE_GRACE_S
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.first_token_s: float | None = None
        self.tools: tuple[str, set[str], bool] | None = None  # (parser, names, parallel)
        self.reader: CallReader | None = None    # reads a forced call (tool_choice) back

    def answer(self, text: str, finish: str, ids: list[int]) -> tuple[dict, str]:
        """(message fields, finish_reason) of a whole chat answer: tool calls parsed out when
        the request declared tools, or read back by the grammar that forced them."""
        if self.reader is not None:
            self.reader.feed(ids)
            calls = self.reader.complete()
            return ({"content": None, "tool_calls": calls}, "tool_calls") if calls else \
                ({"content": text}, finish)
        if self.tools is None:
            return {"content": text}, finish
        parser, names, parallel = self.tools
        content, calls = parse_tool_calls(text, parser, names)
        if not calls:
            return {"content": text}, finish
        return {"content": content or None, "tool_calls": calls[:None if parallel else 1]}, \
            "tool_calls"

    def choice(self, text: str | None, finish: str | None, delta: bool) -> dict:
        if self.kind != "chat":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not delta:
            return {"index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": None, "finish_reason": finish}
        return {"index": 0, "delta": {} if text is None else {"content": text},
                "logprobs": None, "finish_reason": finish}

    def envelope(self, choices: list[dict], chunk: bool, usage: dict | None = None) -> dict:
        obj = "chat.completion" + (".chunk" if chunk else "") if self.kind == "chat" \
            else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "system_fingerprint": None, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    async def events(self) -> AsyncIterator[Event]:
        """The handle's events until the final one; a synthetic timeout past the deadline."""
        loop = asyncio.get_running_loop()
        stream = self.handle.aiter()
        while True:
            try:
                event = await asyncio.wait_for(anext(stream), self.deadline - loop.time())
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                self.handle.cancel()
                yield Event(finish_reason="timeout")
                return
            if event.text and self.first_token_s is None:
                self.first_token_s = time.perf_counter() - self.started
            yield event
            if event.finish_reason:
                return


# -- the app --------------------------------------------------------------------------------------
class _State:
    def __init__(self, engine, api_key: str | None, timeout_s: float,
                 router: LanguageRouter | None, max_body_bytes: int,
                 images: ImageSource | None = None):
        self.engine, self.api_key, self.timeout_s, self.router = engine, api_key, timeout_s, router
        self.max_body_bytes = max_body_bytes
        self.images = images or ImageSource()       # where image parts may be read from
        self.metrics = Metrics()
        self.checked: dict[str, tuple[Path, float]] = {}   # adapter -> (folder, mtime) read fine


def build_app(engine, api_key: str | None = None, request_timeout_s: float = 120,
              router: LanguageRouter | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, host: str = "127.0.0.1",
              allowed_hosts: Iterable[str] = (), tool_parser: str | None = None,
              images: ImageSource | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (which the caller starts and stops), answering as a
    server bound to `host` (and the names in `allowed_hosts`): a web page the user visits
    can neither drive it (foreign Origin, non-JSON body) nor read it (DNS rebinding).
    `images`: where image parts may be read from (default: data: URLs only)."""
    state = _State(engine, api_key, request_timeout_s, router, max_body_bytes, images)
    # tool_parser: how answers are read as tool calls; None: from the chat template
    state.tool_parser = tool_parser
    app = FastAPI(title="loratune", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loratune = state
    # With a key, a wildcard bind may answer any Host: a page has no key to send.
    app.add_middleware(RequestGuard, policy=HostPolicy(host, allowed_hosts,
                                                       any_host=api_key is not None),
                       body=guard_error_body)

    async def auth(request: Request) -> None:
        if not key_matches(request.headers.get("authorization", ""), state.api_key):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError):
        return from_serve_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return APIError(err.status_code, str(err.detail), code="not_found"
                        if err.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        return APIError(500, f"internal error: {type(err).__name__}: {err}",
                        "server_error").response()

    guarded = [Depends(auth)]

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        return await generate(state, request, "chat")

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        return await generate(state, request, "completions")

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return list_models(state)

    @app.post("/v1/adapters/load", dependencies=guarded)
    async def load_adapter(request: Request):
        if engine.pool.adapter_dir is None:   # else any folder on the machine could be read
            raise APIError(403, "adapter loading is off: this server was started without "
                           "--adapters DIR (then folders under DIR can be loaded)",
                           "permission_error", "adapters_disabled")
        body = await parse_body(request, AdapterBody, state.max_body_bytes)
        return await asyncio.to_thread(register_adapter, state, body.name, body.path)

    @app.post("/v1/adapters/unload", dependencies=guarded)
    async def unload_adapter(request: Request):
        body = await parse_body(request, AdapterBody, state.max_body_bytes)
        engine.pool.unload(body.name)
        state.checked.pop(body.name, None)
        return {"object": "adapter", "id": body.name, "loaded": False}

    @app.get("/health")
    async def health():
        stats = engine.stats()
        return {"status": "ok", "model": engine.base_name, "running": stats["running"],
                "queued": stats["queued"], "loaded_adapters": engine.pool.loaded()}

    @app.get("/metrics", dependencies=guarded)
    async def metrics():
        text = state.metrics.render(engine.stats(), len(engine.pool.loaded()))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def list_models(state: _State) -> dict:
    engine = state.engine
    now = int(time.time())
    loaded = set(engine.pool.loaded())
    data = [{"id": engine.base_name, "object": "model", "created": now, "owned_by": "loratune"}]
    data += [{"id": name, "object": "model", "created": now, "owned_by": "loratune",
              "parent": engine.base_name, "loaded": name in loaded}
             for name in engine.pool.names()]
    if state.router is not None:
        data.append({"id": "auto", "object": "model", "created": now, "owned_by": "loratune",
                     "parent": engine.base_name, "routes": state.router.routes})
    return {"object": "list", "data": data}


def resolve_servable(state: _State, model: str) -> dict[str, float]:
    """The engine's adapters for `model`; a 404 names what /v1/models lists (base, adapters,
    "auto" with a router): what a client may send instead."""
    try:
        return state.engine.resolve(model)
    except UnknownAdapter as err:
        raise UnknownAdapter(err.name, [m["id"] for m in list_models(state)["data"]]) from None


def check_adapter(state: _State, name: str) -> None:
    """Read adapter `name` once per folder version, so a broken folder is a 422 up front.

    The pool reads folders on the engine thread, where an error can only end the request;
    checking here first gives the client the right status and keeps the batch untouched.
    """
    folder = state.engine.pool.folder(name)
    config = folder / "adapter_config.json"
    stamp = max((p.stat().st_mtime for p in folder.iterdir() if p.is_file()), default=0.0)
    if state.checked.get(name) == (folder, stamp) or not config.is_file():
        return
    try:
        state.engine.pool.check(name)   # the pool keeps this read for the first use
    except BadAdapter:
        raise
    except Exception as err:  # e.g. a truncated safetensors file
        raise BadAdapter(f"adapter {name!r}: cannot read {folder}: {err}") from None
    state.checked[name] = (folder, stamp)


def register_adapter(state: _State, name: str, path: str | None) -> dict:
    pool = state.engine.pool
    if path is not None:
        pool.register(name, path)
    elif name not in pool.names():
        pool.folder(name)        # raises UnknownAdapter (404) listing the known names
    try:
        check_adapter(state, name)
    except BadAdapter:
        if path is not None:
            pool.forget(name)     # do not keep a name that cannot serve
        raise
    return {"object": "adapter", "id": name, "loaded": name in pool.loaded(),
            "known": pool.names()}


async def generate(state: _State, request: Request, kind: str):
    """Validate, submit and answer one generation request (JSON or server-sent events)."""
    started = time.perf_counter()
    model_label = "(invalid)"
    try:
        body = await parse_body(request, ChatBody if kind == "chat" else CompletionBody,
                                state.max_body_bytes)
        params = body.sampling()
        # Templating and tokenizing a long prompt takes a while: on a worker thread, so /health
        # and the other requests' streams go on meanwhile.
        ids, model, template, images = await asyncio.to_thread(prompt_and_model, state, body,
                                                               kind)
        adapters = resolve_servable(state, model)
        model_label = model
        for name in adapters:
            await asyncio.to_thread(check_adapter, state, name)
        state.engine.pool.check_weights(adapters)
        tools = call_tools(state, body, template) if kind == "chat" else None
        ids, reader = await asyncio.to_thread(force_tool_call, state, body, tools, params, ids)
        pixels = {"images": images.images, "image_inputs": images.inputs} if images else {}
        handle = state.engine.submit(GenerationRequest(ids, adapters, params, state.timeout_s,
                                                       **pixels))
    except (APIError, ServeError) as err:
        err = err if isinstance(err, APIError) else from_serve_error(err)
        state.metrics.record(kind, model_label, err.status, time.perf_counter() - started)
        raise err from None
    call = _Call(kind, model, handle, len(ids), started, state.timeout_s)
    call.tools, call.reader = tools, reader
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(stream(state, call, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await complete(state, call, request)


def call_tools(state: _State, body: ChatBody, template: str | None = None
               ) -> tuple[str, set[str], bool] | None:
    """(parser, declared names, parallel calls allowed) when the answer may call tools; the
    parser read from `template` (the served adapters' stored one), else the tokenizer's own."""
    if not body.tools_on():
        return None
    from loratune.data.templates import resolve_template

    parser = state.tool_parser or parser_for_template(
        template or resolve_template(state.engine.tokenizer, None))
    if parser is None:
        raise APIError(400, "tools: the model's chat template shows no tool-call format; start "
                       f"the server with --tool-parser ({', '.join(PARSERS)})", param="tools")
    names = {(t.get("function") or {}).get("name") for t in body.tools if isinstance(t, dict)}
    return parser, names, body.parallel_tool_calls is not False


def force_tool_call(state: _State, body: ChatBody, tools, params: SamplingParams, ids: list[int]
                    ) -> tuple[list[int], CallReader | None]:
    """For tool_choice "required" or a named function: the prompt with the family's call
    opener after it, the grammar set on `params` (serve/tool_constraint.py) and the reader of
    the answer; unchanged ids and None when the model is free to answer as it likes."""
    names = body.forced_names() if tools is not None else None
    if names is None:
        return ids, None
    parser, _, parallel = tools
    engine = state.engine
    suffix, params.constraint, reader = force_call(
        engine.tokenizer, engine.eos, parser, names, parallel and len(names) > 1,
        params.max_tokens)
    params.stop = []        # a stop string would cut the call short of its closing
    return ids + suffix, reader


def prompt_and_model(state: _State, body: ChatBody | CompletionBody, kind: str
                     ) -> tuple[list[int], str, str | None, ImagePrompt | None]:
    """The prompt's token ids, the model field after routing "auto", the chat template its
    adapters were trained with (None: the tokenizer's own) and the prompt's images (None:
    it has none), on a worker thread."""
    tok = state.engine.tokenizer
    if kind == "chat":
        model = resolve_model_field(state, body.model,
                                    last_user_text([m.plain() for m in body.messages]))
        template = served_template(state, model)
        images = chat_images(state, body, template)
        if images is not None:
            return images.ids, model, template, images
        return chat_prompt_ids(tok, body, template), model, template, None
    route_text = body.prompt if isinstance(body.prompt, str) else \
        (body.prompt[0] if body.prompt and isinstance(body.prompt[0], str) else "")
    return completion_prompt_ids(tok, body), resolve_model_field(state, body.model,
                                                                 route_text), None, None


def chat_images(state: _State, body: ChatBody, template: str | None) -> ImagePrompt | None:
    """The prompt of a chat request with image parts (serve/image_prompt.py); None without.
    A part that cannot be used is a 400 naming it (messages[i].content[j])."""
    count = sum(p.type == "image_url" for m in body.messages if isinstance(m.content, list)
                for p in m.content)
    if not count:
        return None
    limit = state.engine.max_prompt_tokens   # refused before 25,000 tiny images are decoded
    if count > limit:
        raise APIError(400, f"messages: {count} image parts; this server takes at most {limit} "
                       "prompt tokens (--max-prompt-tokens), and each image is one at least",
                       param="messages")
    messages = [m.model_dump() for m in body.messages]
    try:
        prompt = request_images(messages, state.engine.tokenizer, state.images,
                                state.engine.base_name, template)
    except ImageError as err:
        raise APIError(400, str(err), param=err.field) from None
    if prompt is not None and body.tools:
        raise APIError(400, "tools: requests with image parts are served without tools",
                       param="tools")
    return prompt


def served_template(state: _State, model: str) -> str | None:
    """The chat template `model`'s adapters were trained with (data.template, stored in each
    folder); None for the base and adapters without one. Each adapter brings its own, so rows
    of different adapters in one batch are each prompted as trained; a composition of
    adapters trained with different templates has no one prompt: a 400 naming two."""
    try:
        return state.engine.pool.chat_template(resolve_servable(state, model))
    except DataError as err:
        raise APIError(400, f"model '{model}': {err}", param="model") from None


def resolve_model_field(state: _State, model: str, route_text: str) -> str:
    if model != "auto":
        return model
    if state.router is None:
        raise APIError(400, "model 'auto' needs a language router: start the server with "
                       "--route zh=<adapter>,en=<adapter>", code="model_not_found", param="model")
    return state.router.route(route_text, state.engine.base_name)


async def _cancel_on_disconnect(request: Request, handle) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    handle.cancel()


async def complete(state: _State, call: _Call, request: Request) -> JSONResponse:
    """Collect the whole answer; a client that hangs up cancels its request."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, call.handle))
    parts: list[str] = []
    ids: list[int] = []
    last: Event | None = None
    try:
        async for event in call.events():
            parts.append(event.text)
            ids.extend(event.token_ids)
            last = event if event.finish_reason else last
    finally:
        client_gone = watcher.done() and not watcher.cancelled()
        watcher.cancel()
        if last is None:
            call.handle.cancel()
    err = _failure(last)
    seconds = time.perf_counter() - call.started
    if client_gone:       # nobody reads the answer; count it as nginx's "client closed" 499
        err = APIError(499, "client disconnected", code="client_closed")
    if err is not None:
        state.metrics.record(call.kind, call.model, err.status, seconds,
                             last.prompt_tokens if last else 0,
                             last.completion_tokens if last else 0)
        return err.response()
    usage = _usage(last, call.prompt_len)
    state.metrics.record(call.kind, call.model, 200, seconds, usage["prompt_tokens"],
                         usage["completion_tokens"])
    choice = call.choice("".join(parts), last.finish_reason, delta=False)
    if call.kind == "chat":
        fields, choice["finish_reason"] = call.answer("".join(parts), last.finish_reason, ids)
        choice["message"] = {"role": "assistant", **fields}
    return JSONResponse(call.envelope([choice], chunk=False, usage=usage))


async def stream(state: _State, call: _Call, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events shaped like OpenAI's chunks, then `data: [DONE]`.

    When the client disconnects, Starlette cancels this generator: `finally` cancels the
    handle, which frees the request's batch row before the engine's next step.
    """
    last: Event | None = None
    status = 499  # nginx's "client closed request", for the metrics only
    try:
        if call.kind == "chat":
            first = call.choice(None, None, delta=True)
            first["delta"] = {"role": "assistant", "content": None if call.reader else ""}
            yield _sse(call.envelope([first], chunk=True))
        parts = []
        async for event in call.events():
            if event.finish_reason:
                last = event
            if call.reader is not None:     # a forced call: streamed as its tokens come
                deltas = call.reader.feed(event.token_ids)
                if deltas:
                    yield _sse(call.envelope([calls_delta(call, deltas)], chunk=True))
            elif event.text and call.tools is not None:
                parts.append(event.text)  # a call is only known once its text is whole
            elif event.text:
                yield _sse(call.envelope([call.choice(event.text, None, delta=True)], chunk=True))
        err = _failure(last)
        if err is not None:
            status = err.status
            yield _sse(err.body())
        else:
            status = 200
            finish = last.finish_reason
            if call.reader is not None:
                finish = "tool_calls" if call.reader.complete() else finish
            elif call.tools is not None:
                fields, finish = call.answer("".join(parts), finish, [])
                for choice in tool_deltas(call, fields):
                    yield _sse(call.envelope([choice], chunk=True))
            yield _sse(call.envelope([call.choice(None, finish, delta=True)], chunk=True))
            if include_usage:
                yield _sse(call.envelope([], chunk=True, usage=_usage(last, call.prompt_len)))
        yield "data: [DONE]\n\n"
    finally:
        if last is None:
            call.handle.cancel()
        state.metrics.record(call.kind, call.model, status, time.perf_counter() - call.started,
                             last.prompt_tokens if last else 0,
                             last.completion_tokens if last else 0, call.first_token_s)


def tool_deltas(call: _Call, fields: dict) -> list[dict]:
    """The chunks of a tools request's whole answer: its content, or each call as OpenAI
    streams one (index, id, type, name and empty arguments first, then the arguments)."""
    if "tool_calls" not in fields:
        choice = call.choice(None, None, delta=True)
        choice["delta"] = {"content": fields["content"]}
        return [choice]
    out = []
    for i, c in enumerate(fields["tool_calls"]):
        head = dict(c, index=i, function={"name": c["function"]["name"], "arguments": ""})
        out += [calls_delta(call, [head]),
                calls_delta(call, [{"index": i, "function": {"arguments":
                                                              c["function"]["arguments"]}}])]
    return out


def calls_delta(call: _Call, entries: list[dict]) -> dict:
    choice = call.choice(None, None, delta=True)
    choice["delta"] = {"tool_calls": entries}
    return choice


# -- command line ---------------------------------------------------------------------------------
def served_name(model: str) -> str:
    """The base model's id in /v1/models: the embedded name, or the folder / file stem."""
    from loratune.models import EMBEDDED

    return model if model in EMBEDDED else Path(model).expanduser().resolve().stem or model


def key_matches(authorization: str, api_key: str | None) -> bool:
    """Whether an Authorization header brings `api_key` as a bearer token (any header does
    when there is no key). Compared in constant time."""
    if api_key is None:
        return True
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              api_key.encode())


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def startup_api_key(cfg: ServeConfig | UiConfig) -> str | None:
    """The key requests must bring (None: no key), or a ValueError for an unsafe setup: the
    rules of `serve` and `ui` alike (their api_key, host and insecure_no_key options)."""
    key = cfg.api_key
    if key is not None and not key.strip():
        raise ValueError("--api-key is empty: give a key, or leave the option out to serve "
                         "without one (on a loopback address only)")
    if key is None:
        key = os.environ.get("LORATUNE_API_KEY")
        if key is not None and not key.strip():
            raise ValueError("$LORATUNE_API_KEY is set but empty: set a key or unset it")
    if key is None and not is_loopback(cfg.host) and not cfg.insecure_no_key:
        risk = ("start training runs and read every run" if isinstance(cfg, UiConfig)
                else "generate and load adapters")
        raise ValueError(f"--host {cfg.host} is reachable from other machines and no --api-key "
                         "is set: give a key (or $LORATUNE_API_KEY), or --insecure-no-key to "
                         f"let anyone who reaches the port {risk}")
    return key


def check_startup(cfg: ServeConfig) -> str | None:
    """Everything `serve` can refuse before the slow model load; returns the API key.

    (ServeConfig itself refuses values out of range, such as max_body_bytes < 1.)
    """
    key = startup_api_key(cfg)
    folder = cfg.adapters
    if folder is not None and not (folder.strip() and Path(folder).expanduser().is_dir()):
        raise ValueError(f"--adapters {folder}: no such folder (expected a folder with one "
                         "sub-folder per PEFT LoRA adapter)")
    root = cfg.image_root
    if root is not None and not (root.strip() and Path(root).expanduser().is_dir()):
        raise ValueError(f"--image-root {root}: no such folder (expected the folder image "
                         "parts' paths are read under)")
    return key


def image_source(cfg: ServeConfig) -> ImageSource:
    """Where `serve`'s image parts may come from (--image-root, --allow-remote-images)."""
    root = Path(cfg.image_root).expanduser() if cfg.image_root else None
    return ImageSource(root=root, allow_remote=cfg.allow_remote_images,
                       max_pixels=cfg.image_max_pixels)


def run(cfg: ServeConfig) -> int:
    """`loratune serve`: load the base, start the engine, serve HTTP until interrupted."""
    import uvicorn

    from loratune.models import load_model
    from loratune.serve.engine import Engine
    from loratune.serve.pool import AdapterPool

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    api_key = check_startup(cfg)
    router = LanguageRouter.parse(cfg.route) if cfg.route else None
    model, tok = load_model(cfg.model)
    pool = AdapterPool(cfg.adapters, max_adapters=cfg.max_adapters,
                       host_adapters=cfg.host_adapters)
    for name in pool.names():   # each adapter is prompted with its stored template, per request
        stored = adapters_template([pool.folder(name)])
        if stored is not None:
            print(f"note: adapter {name}: {stored[1].split(' (')[0]}")
    engine = Engine(model, tok, pool, base_name=cfg.served_name or served_name(cfg.model.name),
                    max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                    max_prompt_tokens=cfg.max_prompt_tokens,
                    max_completion_tokens=cfg.max_completion_tokens, kv_cache=cfg.kv_cache,
                    cuda_graphs={"auto": None, "on": True, "off": False}[cfg.cuda_graphs])
    if engine.kv_cache_note:
        print(f"note: serving from a dynamic KV cache: {engine.kv_cache_note}")
    if router is not None:
        for target in {*router.routes.values(), router.default} - {None}:
            engine.resolve(target)   # an unknown route target fails now, not on the first request
    if api_key is None and not is_loopback(cfg.host):    # allowed by --insecure-no-key
        print(f"warning: serving on {cfg.host} without --api-key: anyone who can reach this "
              "port can use the model and load adapters")
    app = build_app(engine, api_key=api_key, request_timeout_s=cfg.request_timeout, router=router,
                    max_body_bytes=cfg.max_body_bytes, host=cfg.host,
                    allowed_hosts=cfg.allowed_host, tool_parser=cfg.tool_parser,
                    images=image_source(cfg))
    engine.start()
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        engine.stop()
    return 0
