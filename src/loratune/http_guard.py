"""What a local HTTP server (`serve`, `ui`) accepts from a browser: an ASGI middleware.

Any web page a user visits can send requests to a port on their machine. Two tricks reach a
loopback server: a cross-origin "simple" request (a form or `fetch` with `text/plain`, which
the browser sends without asking first) and DNS rebinding (a foreign name that resolves to
127.0.0.1, so the page reads answers as if same-origin). The guard refuses both:
- the Host header must name this server: loopback names, the bound address, or a name given
  with `--allowed-host` (a wildcard bind with an API key accepts any Host: the key, which no
  page has, is the boundary then);
- a state-changing request (not GET/HEAD/OPTIONS) that carries an Origin must come from the
  origin the Host names (same host and port), or a host given with `--allowed-host`;
  `Origin: null` is refused;
- a state-changing request with a body must say `Content-Type: application/json` (which a
  cross-origin page cannot send without a CORS preflight, and we answer no preflight).
Clients that are not browsers (curl, the OpenAI SDK) send no Origin and pass.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})


def host_name(value: str) -> str:
    """The name in a Host header or netloc, lower-cased, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):   # "[::1]:80"; "[::1]evil.com" or no "]" names nothing of ours
        name, close, rest = value[1:].partition("]")
        ok = close and (not rest or (rest[0] == ":" and rest[1:].isdigit()))
        return name if ok else ""
    if value.count(":") == 1:
        value, _, port = value.partition(":")
        if not port.isdigit():   # "127.0.0.1:80.evil.com" names no port: not one of ours
            return ""
    return value.rstrip(".")


def _is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """Which Host names a server bound to `bind` answers."""

    def __init__(self, bind: str, allowed: Iterable[str] = (), any_host: bool = False):
        self.named = {host_name(h) for h in allowed if h.strip()}   # --allowed-host only
        self.names = set(self.named)
        name = host_name(bind)
        if name not in WILDCARD_BINDS:
            self.names.add(name)
        # A wildcard bind with no named hosts cannot know its own names: it answers any Host
        # only where the caller says a key protects it (any_host), else loopback names only.
        self.any_host = any_host and name in WILDCARD_BINDS and not self.names
        if "*" in self.names:
            self.any_host = True

    def allows(self, host: str) -> bool:
        name = host_name(host)
        return bool(name) and (self.any_host or name in self.names or _is_loopback_name(name))


def refusal(method: str, headers: dict[str, str], policy: HostPolicy,
            has_body: bool) -> tuple[int, str] | None:
    """(status, reason) when a request must be refused, else None. `headers`: lower-case keys."""
    host = headers.get("host", "")
    if not policy.allows(host):
        return 421, (f"Host {host!r} is not a name of this server: give --allowed-host "
                     f"{host_name(host) or 'NAME'} to answer it")
    if method in SAFE_METHODS:
        return None
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if origin.strip().lower() == "null" or not parts.netloc:
            return 403, f"cross-origin request refused (Origin {origin!r})"
        # Same origin means the same host AND port: another local app's page (localhost:3000)
        # is as foreign as evil.com. Only names the operator gave are trusted beyond that.
        if (parts.netloc.lower() != host.strip().lower()
                and host_name(parts.netloc) not in policy.named):
            return 403, f"cross-origin request refused: Origin {origin} is not {host}"
    if has_body:
        ctype = headers.get("content-type", "").partition(";")[0].strip().lower()
        if ctype != "application/json":
            return 415, (f"Content-Type {ctype or '(none)'} refused: send the body as "
                         "'Content-Type: application/json'")
    return None


def _repeated(pairs: list[tuple[str, str]]) -> tuple[int, str] | None:
    """A 400 when Host, Origin or Content-Type comes twice: the guard would judge one copy and
    the app read the other (no browser sends two)."""
    names = [k for k, _ in pairs if k in ("host", "origin", "content-type")]
    twice = sorted({k for k in names if names.count(k) > 1})
    return (400, f"header {twice[0]!r} given more than once") if twice else None


class RequestGuard:
    """ASGI middleware applying `refusal` to every HTTP request; `body(status, message)` makes
    the JSON answer in the server's own error shape."""

    def __init__(self, app, policy: HostPolicy, body: Callable[[int, str], dict]):
        self.app, self.policy, self.body = app, policy, body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        pairs = [(k.decode("latin-1").lower(), v.decode("latin-1"))
                 for k, v in scope.get("headers", [])]
        headers = dict(pairs)
        has_body = (headers.get("content-length", "0").strip() not in ("", "0")
                    or "transfer-encoding" in headers)
        refused = _repeated(pairs) or refusal(scope["method"], headers, self.policy, has_body)
        if refused is None:
            return await self.app(scope, receive, send)
        status, message = refused
        payload = json.dumps(self.body(status, message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
