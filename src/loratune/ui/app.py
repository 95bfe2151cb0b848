"""`loratune ui`: the dashboard's HTTP side. Static pages from ui/static, JSON under /api.

Pages are plain HTML/JS/CSS (no build step); every /api route wants the API key when one is set
(the same rules and check as `serve`); a run's metrics stream as server-sent events that tail
metrics.jsonl while the run is running.

No other web page can drive it: http_guard.RequestGuard answers only Host names of this server
(DNS rebinding) and refuses foreign Origins and non-JSON bodies on state-changing requests; and
every POST under /api must bring this process's CSRF token in `X-CSRF-Token`, which only a page
of this origin can read (it is written into index.html, and GET /api/session gives it to
scripts).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError

from loratune.config.commands import PlanConfig, UiConfig
from loratune.config import RunConfig, adapter_options
from loratune.http_guard import HostPolicy, RequestGuard
from loratune.serve.api import startup_api_key, is_loopback, key_matches
from loratune.ui.confine import Confinement
from loratune.ui.launcher import LaunchError, Launcher, field_errors, validate_launch
from loratune.ui.run_files import MetricsTail, RunFileError, inside, read_completions
from loratune.ui.runs import (RunNotFound, RunTable, find_reports, run_detail, run_path,
                              run_state)
from loratune.ui.studies import find_studies, study_detail, study_row

STATIC = Path(__file__).parent / "static"
POLL_S = 0.3          # how often a stream looks at metrics.jsonl
HEARTBEAT_S = 10.0    # a comment line this often keeps proxies from closing a quiet stream


class UiState:
    def __init__(self, root: Path, launcher: Launcher, api_key: str | None,
                 serve_url: str | None, serve_key: str | None):
        self.root, self.launcher, self.api_key = root, launcher, api_key
        self.serve_url = serve_url.rstrip("/") if serve_url else None
        self.serve_key = serve_key
        self.table = RunTable(root)
        self.csrf_token = secrets.token_urlsafe(32)   # per process: a restart needs a reload


def error(status: int, message: str, errors: list[dict] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "errors": errors or []}, status_code=status)


def build_app(root: str | Path, api_key: str | None = None, serve_url: str | None = None,
              serve_key: str | None = None, launcher: Launcher | None = None,
              host: str = "127.0.0.1", allowed_hosts=(), data_roots=(),
              allow_remote_tracker: bool = False) -> FastAPI:
    """The dashboard over run folder `root` (created if missing), answering as a server bound
    to `host` (and the names in `allowed_hosts`); launched runs read only from `root` and
    `data_roots` (default: the current directory)."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    launcher = launcher or Launcher(root, confinement=Confinement.of(
        root, data_roots, allow_remote_tracker))
    state = UiState(root, launcher, api_key, serve_url, serve_key)
    app = FastAPI(title="loratune ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = state
    app.add_middleware(RequestGuard, policy=HostPolicy(host, allowed_hosts,
                                                       any_host=api_key is not None),
                       body=lambda status, message: {"error": message, "errors": []})
    add_routes(app, state)
    return app


def add_routes(app: FastAPI, state: UiState) -> None:
    root = state.root

    async def auth(request: Request) -> None:
        if not key_matches(request.headers.get("authorization", ""), state.api_key):
            raise LaunchError("missing or wrong API key: send 'Authorization: Bearer <key>'",
                              status=401)

    async def csrf(request: Request) -> None:
        token = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(token.encode(), state.csrf_token.encode()):
            raise LaunchError("missing or wrong X-CSRF-Token: reload the dashboard's page (a "
                              "script gets the token from GET /api/session)", status=403)

    @app.exception_handler(LaunchError)
    async def _launch_error(request: Request, err: LaunchError):
        return error(err.status, str(err), [{"field": err.field, "message": str(err)}]
                     if err.field else None)

    @app.exception_handler(RunNotFound)
    async def _not_found(request: Request, err: RunNotFound):
        return error(404, str(err))

    @app.exception_handler(RunFileError)
    async def _unreadable(request: Request, err: RunFileError):
        return error(422, f"unreadable: {err}")

    @app.get("/")
    async def index():
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("{{csrf_token}}", state.csrf_token),
                            headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    async def static(name: str):
        file = STATIC / name
        if "/" in name or not file.is_file():
            return error(404, f"no file {name}")
        return FileResponse(file)

    guarded = [Depends(auth)]
    acting = [Depends(auth), Depends(csrf)]   # every POST

    @app.get("/api/session", dependencies=guarded)
    async def session():
        return {"csrf_token": state.csrf_token}

    @app.get("/api/info", dependencies=guarded)
    async def info():
        return {"runs": str(root), "serve_url": state.serve_url}

    @app.get("/api/runs", dependencies=guarded)
    async def runs():
        return {"runs": await asyncio.to_thread(state.table.rows)}

    @app.get("/api/runs/{name:path}/metrics", dependencies=guarded)
    async def metrics(name: str, request: Request):
        return StreamingResponse(metric_events(state, name, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs/{name:path}/loss.png", dependencies=guarded)
    async def loss_png(name: str):
        file = inside(run_path(root, name), "loss.png")   # a link out of the run: refused
        return FileResponse(file) if file else error(404, f"run {name} has no loss.png")

    @app.get("/api/runs/{name:path}/completions", dependencies=guarded)
    async def completions(name: str):   # GRPO's sampled completions with their rewards
        return await asyncio.to_thread(read_completions, run_path(root, name))

    @app.post("/api/runs/{name:path}/stop", dependencies=acting)
    async def stop(name: str):
        run_path(root, name)
        state.launcher.stop(name)
        return {"stopping": name}

    @app.post("/api/runs/{name:path}/resume", dependencies=acting)
    async def resume(name: str):
        await asyncio.to_thread(state.launcher.resume, name)
        return {"resumed": name}

    @app.get("/api/runs/{name:path}", dependencies=guarded)
    async def run(name: str):
        detail = await asyncio.to_thread(run_detail, state.table, name)
        return {**detail, "log": state.launcher.log_tail(name),
                "launched_here": name in state.launcher.children}

    @app.get("/api/reports", dependencies=guarded)
    async def reports():
        return {"reports": find_reports(root)}

    @app.get("/api/report-plot/{name:path}", dependencies=guarded)
    async def report_plot(name: str):
        file = (root / name).resolve()
        if root not in file.parents or file.suffix != ".png" or not file.is_file():
            return error(404, f"no plot {name}")
        return FileResponse(file)

    @app.get("/api/studies", dependencies=guarded)
    async def studies():   # `loratune search` output folders
        return {"studies": await asyncio.to_thread(
            lambda: [study_row(root, p) for p in find_studies(root)])}

    @app.get("/api/studies/{name:path}", dependencies=guarded)
    async def study(name: str):
        return await asyncio.to_thread(study_detail, root, name)

    @app.get("/api/schema", dependencies=guarded)
    async def schema():
        return launch_schema()

    @app.post("/api/launch", dependencies=acting)
    async def launch(request: Request):
        body = await json_object(request)
        name, config = body.get("name", ""), body.get("config")
        if not isinstance(config, dict):
            return error(400, "config: expected a JSON object of config sections")
        try:
            cfg = validate_launch(config)
        except ValidationError as err:
            return error(422, "the config is not valid", field_errors(err))
        child = state.launcher.launch(str(name), cfg)
        return {"name": child.name, "pid": child.process.pid}

    @app.get("/api/plan/schema", dependencies=guarded)
    async def plan_schema():
        s = PlanConfig.model_json_schema()
        s["properties"] = {k: v for k, v in s["properties"].items()
                           if k not in ("table", "scaling")}   # the form shows one setup
        return s

    @app.post("/api/plan", dependencies=acting)
    async def plan(request: Request):
        body = await json_object(request)
        try:
            cfg = PlanConfig.model_validate(body)
        except ValidationError as err:
            return error(422, "the plan options are not valid", field_errors(err))
        return plan_result(cfg)

    @app.get("/api/models", dependencies=guarded)
    async def models():
        return await asyncio.to_thread(serve_call, state, "GET", "/v1/models")

    @app.post("/api/chat", dependencies=acting)
    async def chat(request: Request):
        body = await json_object(request)
        names = body.get("models") or []
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
                and isinstance(body.get("messages"), list) and body["messages"]):
            return error(400, "give models (a list of one or more names) and messages (a list)")
        opts = {k: body[k] for k in ("max_tokens", "temperature", "seed") if k in body}
        answers = await asyncio.gather(*[asyncio.to_thread(
            chat_answer, state, m, body["messages"], opts) for m in names])
        return {"answers": answers}


async def json_object(request: Request) -> dict:
    """The request's body as a JSON object, or a 400 saying what was sent instead."""
    try:
        body = await request.json()
    except ValueError:
        raise LaunchError("the body is not JSON: send a JSON object", status=400) from None
    if not isinstance(body, dict):
        raise LaunchError(f"the body is a JSON {type(body).__name__}: expected an object",
                          status=400)
    return body


def _read_events(tail: MetricsTail, path: Path) -> tuple[list[str], str, bool]:
    """One look at a run (in a thread: a large file is read in chunks): the events for what
    was appended (at most one chunk of metrics.jsonl), its state, whether anything was read."""
    before = tail.offset
    records, replaced = tail.read(path)
    events = ["event: reset\ndata: {}\n\n"] if replaced else []   # cut back by a resume
    if records:
        events.append(f"event: metrics\ndata: {json.dumps(records)}\n\n")
    return events, run_state(path), replaced or tail.offset != before


async def metric_events(state: UiState, name: str, request: Request):
    """Server-sent events: `metrics` (a batch of records, from at most one chunk of the file)
    as they are written, `state` when the run's state changes, `reset` when metrics.jsonl was
    cut back (a resume rewrites it to its checkpoint; all is sent again), `unreadable` (and the
    end) for a bad file, and `end` once it is no longer running and all is sent."""
    path = run_path(state.root, name)
    tail, last_state, quiet = MetricsTail(), None, 0.0
    while not await request.is_disconnected():
        try:
            events, now, moved = await asyncio.to_thread(_read_events, tail, path)
        except RunFileError as err:
            yield f"event: unreadable\ndata: {json.dumps(str(err))}\n\n"
            return
        for event in events:
            yield event
        if now != last_state:
            yield f"event: state\ndata: {json.dumps(now)}\n\n"
            last_state = now
        if moved:
            quiet = 0.0
            continue   # more may be waiting: no pause between chunks
        if now != "running":
            yield "event: end\ndata: {}\n\n"
            return
        quiet += POLL_S
        if quiet >= HEARTBEAT_S:
            yield ": alive\n\n"
            quiet = 0.0
        await asyncio.sleep(POLL_S)


def launch_schema() -> dict:
    """The training config's JSON schema for the form: the sections without the adapter (whose
    fields depend on its method), output_dir (the run's name decides it), search and federated
    (read by `loratune search` / `loratune federate`, not by the run the form starts), and one
    schema per adapter method."""
    run = RunConfig.model_json_schema()
    run["properties"] = {k: v for k, v in run["properties"].items()
                         if k not in ("adapter", "output_dir", "search", "federated")}
    adapters = {}
    for method, cls in adapter_options().items():
        s = cls.model_json_schema()
        s["properties"] = {k: v for k, v in s["properties"].items()
                           if k not in ("method", "use_dora")}
        adapters[method] = s
    return {"run": run, "adapters": adapters, "default_method": "lora"}


def plan_result(cfg: PlanConfig) -> dict | JSONResponse:
    from loratune.plan import PlanError
    from loratune.plan.memory import estimate
    from loratune.plan.report import run as plan_text
    from loratune.plan.report import setup_of
    from loratune.plan.shapes import resolve_shape

    try:
        shape = resolve_shape(cfg.model)
        breakdown = estimate(shape, setup_of(cfg)).as_dict()
        text = plan_text(cfg)
    except (PlanError, ValueError, OSError) as err:
        return error(422, str(err), [{"field": "model", "message": str(err)}])
    return {"model": shape.name, "breakdown": breakdown, "report": text}


def serve_call(state: UiState, method: str, path: str, body: dict | None = None,
               timeout: float = 300) -> dict:
    """One JSON call to the chat server (`--serve-url`); an {'error': ...} dict on failure."""
    if not state.serve_url:
        return {"error": "no chat server: start the dashboard with --serve-url "
                "http://127.0.0.1:8000 (a running `loratune serve`)"}
    req = urllib.request.Request(state.serve_url + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    if state.serve_key:
        req.add_header("Authorization", f"Bearer {state.serve_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = str(err)
        return {"error": f"{state.serve_url}: {err.code}: {message}"}
    except (urllib.error.URLError, OSError, ValueError) as err:
        return {"error": f"{state.serve_url}: {err} (a server the dashboard started answers "
                "once its model is loaded: try again in a moment)"}


def chat_answer(state: UiState, model: str, messages: list, opts: dict) -> dict:
    reply = serve_call(state, "POST", "/v1/chat/completions",
                       {"model": model, "messages": messages, **opts})
    if "error" in reply:
        return {"model": model, "error": reply["error"]}
    return {"model": model, "answer": reply["choices"][0]["message"]["content"],
            "usage": reply.get("usage")}


def run(cfg: UiConfig) -> int:
    """`loratune ui`: serve the dashboard until interrupted; stop the runs it started."""
    import uvicorn

    api_key = startup_api_key(cfg)
    if cfg.serve_url and cfg.serve_adapters:
        raise ValueError("give --serve-url (a running server) or --serve-adapters (start one), "
                         "not both")
    if cfg.serve_adapters and not Path(cfg.serve_adapters).is_dir():
        raise ValueError(f"--serve-adapters {cfg.serve_adapters}: no such folder (expected one "
                         "sub-folder per adapter)")
    if api_key is None and not is_loopback(cfg.host):
        print(f"warning: the dashboard listens on {cfg.host} without --api-key: anyone who can "
              "reach this port can start training runs")
    if cfg.allow_remote_tracker:
        print("note: launched runs may send their config and metrics to any tracker URL "
              "(--allow-remote-tracker)")
    chat_server, serve_url = None, cfg.serve_url
    if cfg.serve_adapters:
        chat_server, serve_url = start_chat_server(cfg.serve_adapters, cfg.serve_model)
        print(f"chat server: {serve_url} (loratune serve --adapters {cfg.serve_adapters})")
    app = build_app(cfg.runs, api_key=api_key, serve_url=serve_url, serve_key=cfg.serve_key,
                    host=cfg.host, allowed_hosts=cfg.allowed_host, data_roots=cfg.data_root,
                    allow_remote_tracker=cfg.allow_remote_tracker)
    print(f"loratune ui: http://{cfg.host}:{cfg.port}/ over {Path(cfg.runs).resolve()}",
          flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        app.state.ui.launcher.close()
        if chat_server is not None:
            chat_server.terminate()
            chat_server.wait(timeout=30)
    return 0


def start_chat_server(adapters: str, model: str | None) -> tuple[subprocess.Popen, str]:
    """`loratune serve` on a free loopback port over `adapters`, as a child process; its URL.
    It answers once its model is loaded; until then the chat page says it is starting."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "loratune", "serve", "--adapters", adapters, "--host",
           "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if model:
        cmd += ["--model", model]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL), f"http://127.0.0.1:{port}"
