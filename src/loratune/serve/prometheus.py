"""Server metrics in the Prometheus text format (version 0.0.4), written by hand.

The API records one observation per finished request; the engine and adapter pool are read
when /metrics is scraped, so their counters never drift from the engine's own numbers.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

# Seconds. CPU serving of small models spans ~10 ms (first token) to minutes (long answers).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _escape(value: str) -> str:
    # The exposition format escapes backslash, double quote and newline in label values.
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def _number(x: float) -> str:
    if isinstance(x, float) and math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if isinstance(x, float) else str(int(x))


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms expose them."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out = [f"{name}_bucket{_labels({**labels, 'le': _number(float(b))})} {c}"
               for b, c in zip(self.bounds, self.counts)]
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {_number(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    """Thread-safe request counters; `render(engine_stats)` produces the /metrics body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (endpoint, model, status) -> requests
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.prompt_tokens: dict[str, int] = defaultdict(int)                # model -> tokens
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)         # endpoint -> seconds
        self.first_token = Histogram()                                       # streaming only

    def record(self, endpoint: str, model: str, status: int, seconds: float,
               prompt_tokens: int = 0, completion_tokens: int = 0,
               first_token_s: float | None = None) -> None:
        """Count one finished request (any status) and its tokens and latency."""
        with self._lock:
            self.requests[(endpoint, model, str(status))] += 1
            self.prompt_tokens[model] += prompt_tokens
            self.completion_tokens[model] += completion_tokens
            self.latency[endpoint].observe(seconds)
            if first_token_s is not None:
                self.first_token.observe(first_token_s)

    def render(self, engine_stats: dict | None = None, loaded_adapters: int | None = None) -> str:
        """The exposition text: our counters, then the engine's and the adapter pool's."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        with self._lock:
            family("loratune_requests_total", "counter",
                   "HTTP generation requests by endpoint, model field and status code",
                   [f"loratune_requests_total"
                    f"{_labels({'endpoint': e, 'model': m, 'status': s})} {n}"
                    for (e, m, s), n in sorted(self.requests.items())])
            family("loratune_prompt_tokens_total", "counter", "prompt tokens of served requests",
                   [f"loratune_prompt_tokens_total{_labels({'model': m})} {n}"
                    for m, n in sorted(self.prompt_tokens.items())])
            family("loratune_completion_tokens_total", "counter",
                   "generated tokens of served requests",
                   [f"loratune_completion_tokens_total{_labels({'model': m})} {n}"
                    for m, n in sorted(self.completion_tokens.items())])
            family("loratune_request_duration_seconds", "histogram",
                   "time from request received to last byte prepared",
                   [line for e, h in sorted(self.latency.items())
                    for line in h.lines("loratune_request_duration_seconds", {"endpoint": e})])
            family("loratune_time_to_first_token_seconds", "histogram",
                   "streaming requests: time from request received to the first text",
                   self.first_token.lines("loratune_time_to_first_token_seconds", {}))
        if engine_stats is not None:
            out.extend(_engine_lines(engine_stats, loaded_adapters))
        return "\n".join(out) + "\n"


def _engine_lines(stats: dict, loaded_adapters: int | None) -> list[str]:
    pool = stats.get("pool", {})
    rows = [
        ("loratune_engine_requests_total", "counter", "requests the engine accepted",
         [f"loratune_engine_requests_total {int(stats.get('requests', 0))}"]),
        ("loratune_engine_prompt_tokens_total", "counter", "prompt tokens the engine processed",
         [f"loratune_engine_prompt_tokens_total {int(stats.get('prompt_tokens', 0))}"]),
        ("loratune_engine_completion_tokens_total", "counter", "tokens the engine generated",
         [f"loratune_engine_completion_tokens_total {int(stats.get('completion_tokens', 0))}"]),
        ("loratune_running_requests", "gauge", "requests in the running batch",
         [f"loratune_running_requests {int(stats.get('running', 0))}"]),
        ("loratune_queued_requests", "gauge", "requests waiting for a batch slot",
         [f"loratune_queued_requests {int(stats.get('queued', 0))}"]),
        ("loratune_adapter_requests_total", "counter", "engine requests that used each adapter",
         [f"loratune_adapter_requests_total{_labels({'adapter': a})} {int(n)}"
          for a, n in sorted(stats.get("per_adapter", {}).items())]),
    ]
    for key in ("hits", "misses", "evictions", "loads"):
        name = f"loratune_adapter_pool_{key}_total"
        rows.append((name, "counter", f"adapter pool {key}", [f"{name} {int(pool.get(key, 0))}"]))
    rows.append(("loratune_adapter_pool_load_seconds_total", "counter",
                 "time spent reading adapters from disk",
                 ["loratune_adapter_pool_load_seconds_total "
                  + _number(float(pool.get("load_seconds", 0.0)))]))
    if loaded_adapters is not None:
        rows.append(("loratune_adapters_loaded", "gauge", "adapters in memory now",
                     [f"loratune_adapters_loaded {loaded_adapters}"]))
    out: list[str] = []
    for name, kind, help_text, samples in rows:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
    return out
