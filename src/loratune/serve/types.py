"""What flows between the HTTP layer and the engine: requests, streamed events, errors."""

from __future__ import annotations

from dataclasses import dataclass, field


class ServeError(ValueError):
    """A request the engine refuses; `status` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param          # the request field at fault, when there is one


class UnknownAdapter(ServeError):
    status = 404

    def __init__(self, name: str, known: list[str]):
        names = ", ".join(known) or "(none)"
        super().__init__(f"unknown model or adapter {name!r}; known: {names}", param="model")
        self.name, self.known = name, known


class BadAdapter(ServeError):
    """An adapter folder that cannot be used (missing files, another base's shapes, unsafe name)."""

    status = 422


class NonFiniteOutput(ServeError):
    """A request whose adapter made the model's logits inf or NaN: it alone ends."""

    status = 422


class QueueFull(ServeError):
    status = 429


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Chooses the token itself when set (a forced tool call: serve/tool_constraint.py); per
    # request and stateful, so never shared between requests.
    constraint: object | None = None


@dataclass
class GenerationRequest:
    """One completion: token ids of the prompt and the adapters it runs with.

    `adapters` maps adapter name -> weight; empty means the base model alone. A single adapter
    is {"name": 1.0}; a composition such as "fin+region_cn" is {"fin": 1.0, "region_cn": 1.0}.
    """

    prompt_ids: list[int]
    adapters: dict[str, float] = field(default_factory=dict)
    params: SamplingParams = field(default_factory=SamplingParams)
    timeout_s: float | None = None
    # A vision-language model's images: how many, and the family's pixel inputs (tensors, as
    # models/vision.encode_vision makes them); each image's tokens are in prompt_ids already.
    images: int = 0
    image_inputs: dict = field(default_factory=dict)


@dataclass
class Event:
    """A step of a request's output: new text (possibly empty) and, at the end, why it stopped.

    finish_reason: None while running; "stop" (eos or a stop string), "length" (max_tokens),
    "timeout", "cancelled" or "error" (then `error` says why, and `status` is the HTTP status it
    stands for: 4xx when the request itself was at fault, None for a server fault).
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
