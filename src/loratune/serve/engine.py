"""The serving engine: continuous batching of generation requests over one base model.

One background thread owns the model. Between decode steps it admits queued requests (their
prompts are prefilled together, each row with its own adapter, into free rows of the batch's
KV cache) and retires finished ones (their rows leave the cache). Every decode step is a single
forward of all running rows, each row with its own adapter slot (see multi_lora.py). The batch
and its cache are a SlotCache (slot_batch.py: preallocated rows written in place, optionally
replayed as CUDA graphs) or, for models it cannot serve, transformers' DynamicCache
(dynamic_batch.py).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from loratune.adapters.registry import RowLead
from loratune.models.modules import cache_keyword, eos_ids
from loratune.serve.dynamic_batch import DynamicBatch
from loratune.serve.image_rows import ImageRows, SeenImages, is_vision_model, vision_refusal
from loratune.serve.pool import AdapterPool, entry_key
from loratune.serve.prefill_rows import lead_tokens, row_columns
from loratune.serve.sampling import check_seed, find_stop, held_back, new_generator, pick_token
from loratune.serve.slot_batch import SlotBatch
from loratune.serve.slot_cache import slot_cache_refusal
from loratune.serve.types import (Event, GenerationRequest, NonFiniteOutput, QueueFull,
                                  ServeError, UnknownAdapter)


class Handle:
    """A submitted request's stream of events, readable from threads or from asyncio."""

    def __init__(self):
        self._cond = threading.Condition()
        self._events: deque[Event] = deque()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self.cancelled = threading.Event()

    def push(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
            waker = self._waker
        if waker is not None:
            loop, flag = waker
            # A reader whose event loop is gone cannot be woken; the events stay queued.
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(flag.set)
                except RuntimeError:
                    pass

    def cancel(self) -> None:
        """Stop generating (a client went away); the engine frees the row before its next step."""
        self.cancelled.set()

    def __iter__(self):
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                event = self._events.popleft()
            yield event
            if event.finish_reason:
                return

    async def aiter(self):
        flag = asyncio.Event()
        with self._cond:
            self._waker = (asyncio.get_running_loop(), flag)
        while True:
            with self._cond:
                event = self._events.popleft() if self._events else None
                if event is None:
                    flag.clear()
            if event is None:
                await flag.wait()
                continue
            yield event
            if event.finish_reason:
                return

    def result(self) -> Event:
        """Block until done; one event holding the whole text and token ids."""
        text, ids, last = [], [], Event()
        for last in self:
            text.append(last.text)
            ids.extend(last.token_ids)
        return Event("".join(text), ids, last.finish_reason, last.error, last.status,
                     last.prompt_tokens, last.completion_tokens)


@dataclass
class Sequence:
    request: GenerationRequest
    handle: Handle
    key: str
    deadline: float | None
    slot: int = 0
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""         # the tokens decoded
    sent: int = 0          # characters of the decoded text already streamed
    done: bool = False
    in_batch: bool = False           # holds a row of the running batch
    final: Event | None = None       # the last event, held back until the row is retired
    poisoned: bool = False           # its logits went non-finite: reset what it used
    lead: RowLead | None = None      # its adapter's virtual tokens before the prompt (pool.lead)
    seen: SeenImages | None = None   # its images through the vision tower, until its prefill
    position_shift: int = 0          # its positions minus its columns (multimodal RoPE)


class Engine:
    """Base model + adapter pool + a running batch; `submit` from any thread."""

    def __init__(self, model: nn.Module, tokenizer, pool: AdapterPool, base_name: str = "base",
                 max_batch: int = 16, max_queue: int = 64, max_prompt_tokens: int = 2048,
                 max_completion_tokens: int = 1024, prefill_tokens: int = 4096,
                 kv_cache: str = "auto", cuda_graphs: bool | None = None,
                 kv_preallocate: bool | None = None):
        """kv_cache: "slots" (preallocated rows written in place), "dynamic" (transformers'
        DynamicCache, grown by concatenation) or "auto" (slots where the model allows).
        cuda_graphs: replay recorded decode steps (slots on CUDA only; None = on with CUDA).
        kv_preallocate: give the slot cache its full size at the first request (None = on CUDA).
        """
        self.model = model.eval().requires_grad_(False)
        self.cache_key = cache_keyword(model.forward) or "past_key_values"
        self.tokenizer = tokenizer
        self.pool = pool
        self.base_name = base_name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.max_completion_tokens = max_completion_tokens
        self.prefill_tokens = prefill_tokens    # prompt tokens per joint prefill forward
        # a vision-language model's context is its text model's
        self.context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.row_slots = pool.bind(model)
        self.images = ImageRows(model, self.row_slots) if is_vision_model(model) else None
        self.image_refusal = vision_refusal(model)     # None: images served, or a text model
        self.eos = eos_ids(model, tokenizer)
        self.queue: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_cache, self.kv_cache_note = self._choose_cache(kv_cache)
        self.batch = self._make_batch(cuda_graphs, kv_preallocate)
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.counts = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "steps": 0,
                       "prefills": 0, "errors": 0}
        self.per_adapter: dict[str, int] = {}

    def _choose_cache(self, choice: str) -> tuple[str, str | None]:
        """"slots" or "dynamic", and why slots were not taken when "auto" fell back."""
        if choice not in ("auto", "slots", "dynamic"):
            raise ValueError(f"kv_cache must be 'auto', 'slots' or 'dynamic', got {choice!r}")
        if choice == "dynamic":
            return "dynamic", None
        refusal = slot_cache_refusal(self.model, self.columns())
        if refusal is None:
            return "slots", None
        if choice == "slots":
            raise ValueError(f"kv_cache 'slots' cannot serve this model: {refusal}")
        return "dynamic", refusal

    def columns(self) -> int:
        """The longest row a request can make: prompt plus completion, within the context."""
        longest = self.max_prompt_tokens + self.max_completion_tokens
        return min(longest, self.context) if self.context else longest

    def _make_batch(self, cuda_graphs: bool | None, preallocate: bool | None):
        on_cuda = self.device.type == "cuda"
        if cuda_graphs and not (on_cuda and self.kv_cache == "slots"):
            raise ValueError("cuda_graphs needs the model on a CUDA device and kv_cache 'slots' "
                             f"(the model is on {self.device}, kv_cache is {self.kv_cache!r})")
        if self.kv_cache == "dynamic":
            return DynamicBatch(self.model, self.cache_key, self.row_slots, self.device,
                                self.images)
        graphs = "cuda" if (on_cuda if cuda_graphs is None else cuda_graphs) else None
        return SlotBatch(self.model, self.cache_key, self.row_slots, self.device,
                         rows=self.max_batch, columns=self.columns(),
                         preallocate=on_cuda if preallocate is None else preallocate,
                         graphs=graphs, lock=self.pool.lock, images=self.images)

    # -- the public side -----------------------------------------------------------------------
    def resolve(self, model_field: str) -> dict[str, float]:
        """`model` of a request → adapters: base name, "a", "a+b" or "a:0.7+b:0.3"."""
        if not isinstance(model_field, str) or not model_field.strip():
            raise ServeError("model must name the base model or an adapter")
        if model_field == self.base_name:
            return {}
        adapters: dict[str, float] = {}
        for part in model_field.split("+"):
            name, _, weight = part.strip().partition(":")
            self._known(name)
            adapters[name] = adapters.get(name, 0.0) + adapter_weight(weight, model_field)
            check_weight(name, adapters[name], model_field)   # "a:1e308+a:1e308" sums to inf
        return adapters

    def _known(self, name: str) -> None:
        """A BadAdapter for a name no folder may have; an UnknownAdapter listing every name
        a request's `model` may give (the base's first)."""
        try:
            self.pool.folder(name)
        except UnknownAdapter as err:
            raise UnknownAdapter(name, [self.base_name, *err.known]) from None

    def submit(self, request: GenerationRequest) -> Handle:
        self._check(request)
        for name in request.adapters:
            self._known(name)
        if len(request.adapters) == 1:      # known once read (the API reads it first)
            name = next(iter(request.adapters))
            self._check_row(request, self.pool.lead_tokens.get(name, 0), name)
        return self._enqueue(request)

    def _enqueue(self, request: GenerationRequest) -> Handle:
        """Queue `request` as it is (submit checks it first)."""
        timeout = request.timeout_s
        seq = Sequence(request, Handle(), entry_key(request.adapters) if request.adapters
                       else self.base_name, time.monotonic() + timeout if timeout is not None else None)
        with self.cond:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"request queue is full ({self.max_queue} waiting); retry later")
            self.queue.append(seq)
            self.counts["requests"] += 1
            self.counts["prompt_tokens"] += len(request.prompt_ids)
            self.per_adapter[seq.key] = self.per_adapter.get(seq.key, 0) + 1
            self.cond.notify()
        return seq.handle

    def start(self) -> Engine:
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self._loop, name="loratune-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        for seq in list(self.queue) + self.running:
            self._finish(seq, "cancelled")
            self._publish(seq)
        self.queue.clear()
        self._reset_batch()

    def stats(self) -> dict:
        with self.cond:
            return {**self.counts, "running": len(self.running), "queued": len(self.queue),
                    "per_adapter": dict(self.per_adapter), "pool": self.pool.stats(),
                    "kv_cache": self.kv_cache, "kv_cache_note": self.kv_cache_note,
                    "cuda_graphs": getattr(self.batch, "graphs", None) is not None}

    # -- checks ----------------------------------------------------------------------------------
    def _check(self, request: GenerationRequest) -> None:
        p, n = request.params, len(request.prompt_ids)
        if n == 0:
            raise ServeError("the prompt is empty")
        if request.images and self.images is None:
            why = self.image_refusal or "it is a text model"
            raise ServeError(f"model {self.base_name!r} takes no image parts here: {why}",
                             param="messages")
        if n > self.max_prompt_tokens:
            raise ServeError(f"the prompt has {n} tokens{self._image_share(request)}; this server "
                             f"takes at most {self.max_prompt_tokens} (--max-prompt-tokens)")
        if not 1 <= p.max_tokens <= self.max_completion_tokens:
            raise ServeError(f"max_tokens must be between 1 and {self.max_completion_tokens}, "
                             f"got {p.max_tokens}")
        if self.context and n + p.max_tokens > self.context:
            raise ServeError(f"prompt ({n} tokens) plus max_tokens ({p.max_tokens}) exceeds the "
                             f"model's context of {self.context} tokens")
        # Written so that NaN fails too: every comparison with NaN is false.
        if not (math.isfinite(p.temperature) and p.temperature >= 0 and 0 < p.top_p <= 1
                and p.top_k >= 0):
            raise ServeError(f"temperature must be a finite number ≥ 0, top_p in (0, 1] and "
                             f"top_k ≥ 0; got {p.temperature}, {p.top_p} and {p.top_k}")
        check_seed(p.seed)
        vocab = self.model.get_input_embeddings().num_embeddings
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
            raise ServeError(f"prompt token ids must be in [0, {vocab})")

    def _image_share(self, request: GenerationRequest) -> str:
        """" (M of them image tokens, for K images)": images count toward the prompt."""
        if not request.images or self.images is None:
            return ""
        tokens = request.prompt_ids.count(self.images.image_id)
        return f" ({tokens} of them image tokens, for its {request.images} image(s))"

    def _check_row(self, request: GenerationRequest, virtual: int, name: str | None) -> None:
        """A row holds the adapter's virtual tokens, the prompt and max_tokens: within the
        longest row this server keeps (columns()), or a 400 that says so."""
        n, k = len(request.prompt_ids), request.params.max_tokens
        if virtual and virtual + n + k > self.columns():
            raise ServeError(f"adapter {name!r} puts {virtual} virtual tokens before the prompt: "
                             f"with the prompt ({n} tokens) and max_tokens ({k}) that is "
                             f"{virtual + n + k}, more than the {self.columns()} tokens a row "
                             "may hold here (the context, or max prompt plus completion tokens)")

    # -- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.queue and not self.running:
                    self.cond.wait()
                if self.stopping:
                    return
            try:
                self.step()
            except Exception as err:  # a failed forward must not take the server down
                self.counts["errors"] += 1
                for seq in self.running:
                    self._finish(seq, "error", f"{type(err).__name__}: {err}")
                    self.pool.release(seq.slot)
                    self._publish(seq)
                self.running = []
                self._reset_batch()

    # no_grad, not inference_mode: slot tensors made here are cleared later from other threads.
    @torch.no_grad()
    def step(self) -> None:
        """Admit what fits, then one decode step for every running row."""
        self._admit()
        self._retire()
        if not self.running:
            return
        rows = self.running
        logits = self.batch.decode(rows)
        self.counts["steps"] += 1
        self._advance(rows, logits)
        self._retire()

    def _admit(self) -> None:
        """Take queued requests while rows and adapter slots allow; prefill them together."""
        joining: list[Sequence] = []
        budget = self.prefill_tokens
        while len(self.running) + len(joining) < self.max_batch:
            with self.cond:
                if not self.queue:
                    break
                seq = self.queue[0]
            if seq.handle.cancelled.is_set() or self._expired(seq):
                with self.cond:
                    self.queue.popleft()
                self._finish(seq, "cancelled" if seq.handle.cancelled.is_set() else "timeout")
                continue
            try:
                ready = self._prepare(seq)
            except Exception as err:  # this request's own failure (an unreadable adapter file,
                with self.cond:       # a seed no generator takes): it alone ends, the queue moves
                    self.queue.popleft()
                self._fail(seq, err)
                continue
            if not ready:
                break      # every adapter slot is in use by running rows: wait for one to end
            tokens = row_columns(seq)     # the prompt and its adapter's virtual tokens
            if joining and tokens > budget:
                self.pool.release(seq.slot)
                break      # the next step takes it: one prefill stays within its token budget
            with self.cond:
                self.queue.popleft()
            if not self._see(seq):
                continue   # its images failed: it alone ended, nothing of it is in the batch
            budget -= tokens
            joining.append(seq)
        if not joining:
            return
        try:
            self._prefill(joining)
        except Exception as err:  # these requests fail; the running batch is untouched
            self.counts["errors"] += 1
            for seq in joining:
                self.pool.release(seq.slot)
                self._finish(seq, "error", f"{type(err).__name__}: {err}")

    def _prepare(self, seq: Sequence) -> bool:
        """Pin the request's adapter slot and make its generator; False when no slot is free.

        On an error nothing stays pinned: a slot held by a request that never runs would be
        reserved for ever, even after its adapter is unloaded.
        """
        slot = self.pool.acquire(seq.request.adapters)
        if slot is None:
            return False
        try:
            seq.lead = self.pool.lead(slot)
            self._check_row(seq.request, lead_tokens(seq.lead), seq.key)
            check_images_lead(seq.request, lead_tokens(seq.lead), seq.key)
            seq.generator = new_generator(seq.request.params)
        except Exception:
            self.pool.release(slot)
            raise
        seq.slot = slot
        return True

    def _see(self, seq: Sequence) -> bool:
        """Run the vision tower on the request's images (image_rows.py); False when that
        failed: the request ends, its slot is freed and an adapter that overflowed is read
        again on its next use, as a row whose logits overflow (see _retire)."""
        if not seq.request.images:
            return True
        try:
            seq.seen = self.images.see(seq.request.prompt_ids, seq.request.image_inputs,
                                       seq.slot, bool(seq.request.adapters), self.device)
        except Exception as err:
            self.pool.release(seq.slot)
            if isinstance(err, NonFiniteOutput):
                self.pool.drop_entry(seq.key)
            self._fail(seq, err)
            return False
        seq.position_shift = seq.seen.shift
        return True

    def _prefill(self, seqs: list[Sequence]) -> None:
        """One forward over the new prompts (each row with its adapter); they join the batch."""
        try:
            logits = self.batch.prefill(seqs)
        finally:
            for seq in seqs:
                seq.seen = None       # the features are in the cache now (or failed)
        self.counts["prefills"] += 1
        self.running.extend(seqs)
        for seq in seqs:
            seq.in_batch = True
        self._advance(seqs, logits)

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Choose and record each row's next token from logits [rows, vocab]; a failure here
        ends its row alone (the forward was shared, the sampling is each request's own).
        A row whose logits are not finite fails: argmax over NaN is a token nobody chose."""
        # One device-to-host copy for all rows: the greedy choice, or -1 where not finite.
        codes = torch.where(torch.isfinite(logits).all(-1), logits.argmax(-1), -1).tolist()
        for i, seq in enumerate(seqs):
            try:
                if codes[i] < 0:
                    raise self._non_finite(seq)
                params = seq.request.params
                self._append(seq, pick_token(logits[i], params, seq.generator, codes[i]))
            except Exception as err:
                self._fail(seq, err)

    def _non_finite(self, seq: Sequence) -> Exception:
        """The error of a row whose logits went inf/NaN; its row and adapter slot are marked
        to be reset when it leaves (see _retire)."""
        seq.poisoned = True
        where = f"at completion token {len(seq.tokens) + 1}"
        if seq.request.adapters:
            return NonFiniteOutput(f"model {seq.key!r} produced non-finite logits (inf or NaN) "
                                   f"{where}: its adapter weights overflow the model's numbers; "
                                   "this request was ended, others are unaffected")
        return RuntimeError(f"the base model produced non-finite logits (inf or NaN) {where}; "
                            "this request was ended, others are unaffected")

    def _append(self, seq: Sequence, token: int) -> None:
        """Record a sampled token; stream the text that is now safe to send."""
        p = seq.request.params
        if token in self.eos:
            self._send_rest(seq, seq.text, [])
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        self.counts["completion_tokens"] += 1
        text = seq.text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        stop_at = find_stop(text, p.stop, seq.sent) if p.stop else None
        if stop_at is not None:
            self._send_rest(seq, text[:stop_at], [token])
            self._finish(seq, "stop")
            return
        if len(seq.tokens) >= p.max_tokens:
            self._send_rest(seq, text, [token])
            self._finish(seq, "length")
            return
        # Hold back an unfinished multi-byte character and anything that may begin a stop string.
        safe = len(text.rstrip("\ufffd"))
        safe -= held_back(text[:safe], p.stop) if p.stop else 0
        self._send(seq, text[:max(safe, seq.sent)], [token])

    def _send(self, seq: Sequence, text: str, ids: list[int]) -> None:
        seq.handle.push(Event(text[seq.sent:], ids, prompt_tokens=len(seq.request.prompt_ids),
                              completion_tokens=len(seq.tokens)))
        seq.sent = max(seq.sent, len(text))

    def _send_rest(self, seq: Sequence, text: str, ids: list[int]) -> None:
        """The end of a reply: what was held back, less a character the end cut in half.

        A byte-level tokenizer spells a Chinese character or an emoji with several tokens; a
        reply cut between them decodes to U+FFFD, which is not part of any answer.
        """
        text = text.rstrip("\ufffd")
        if len(text) > seq.sent or ids:
            self._send(seq, text, ids)

    def _fail(self, seq: Sequence, err: Exception) -> None:
        """End one request with `err`; a ServeError keeps its status (a bad adapter is a 422)."""
        self.counts["errors"] += 1
        if isinstance(err, ServeError):
            self._finish(seq, "error", str(err), err.status)
        else:
            self._finish(seq, "error", f"{type(err).__name__}: {err}")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None,
                status: int | None = None) -> None:
        """Mark `seq` finished. A row of the batch tells its client once _retire has freed the
        row and its slot, so a client that saw the end sees them free (stats, unload)."""
        if seq.done:
            return
        seq.done = True
        seq.final = Event(finish_reason=reason, error=error, status=status,
                          prompt_tokens=len(seq.request.prompt_ids),
                          completion_tokens=len(seq.tokens))
        if not seq.in_batch:
            self._publish(seq)

    def _publish(self, seq: Sequence) -> None:
        final, seq.final = seq.final, None
        if final is not None:
            seq.handle.push(final)

    def _expired(self, seq: Sequence) -> bool:
        return seq.deadline is not None and time.monotonic() > seq.deadline

    def _retire(self) -> None:
        """Drop finished, cancelled and timed-out rows from the batch and the cache, free their
        slots, then send their final events."""
        keep, ended = [], []
        for i, seq in enumerate(self.running):
            if not seq.done:
                if seq.handle.cancelled.is_set():
                    self._finish(seq, "cancelled")
                elif self._expired(seq):
                    self._finish(seq, "timeout")
            if seq.done:
                self.pool.release(seq.slot)
                if seq.poisoned and seq.request.adapters:
                    self.pool.drop_entry(seq.key)   # its slot is zeroed, read again on next use
                ended.append(seq)
            else:
                keep.append(i)
        if ended:
            self._keep_rows(keep)
        for seq in ended:
            self._publish(seq)

    def _keep_rows(self, keep: list[int]) -> None:
        """Shrink the batch and its cache to the rows `keep` (the batch may reorder them)."""
        order = self.batch.keep(keep)
        self.running = [self.running[i] for i in order]

    def _reset_batch(self) -> None:
        self.batch.reset()


def check_images_lead(request: GenerationRequest, virtual: int, name: str) -> None:
    """Images and an adapter's virtual tokens (prompt or prefix tuning) in one row are not
    served: the image positions (multimodal RoPE) are computed for the prompt alone."""
    if request.images and virtual:
        raise ServeError(f"adapter {name!r} puts {virtual} virtual tokens before the prompt; "
                         "requests with images are served with LoRA-kind adapters only",
                         param="model")


# Compositions are folded into B in float32 (pool.compose): a weight beyond its range is inf.
WEIGHT_MAX = torch.finfo(torch.float32).max


def adapter_weight(text: str, model_field: str) -> float:
    """The weight after "name:" in a composition (1 when absent); finite, or a 400."""
    try:
        weight = float(text) if text else 1.0
    except ValueError:
        weight = None
    if weight is None or not math.isfinite(weight):
        raise ServeError(f"model: adapter weight {text!r} in {model_field!r} must be a finite "
                         "number", param="model")
    return weight


def check_weight(name: str, weight: float, model_field: str) -> None:
    """A weight (summed over repeats of `name`) must be finite in float32, where it is used."""
    if not abs(weight) <= WEIGHT_MAX:
        raise ServeError(f"model: the weight of adapter {name!r} in {model_field!r} is "
                         f"{weight:g}, not a finite float32 number (at most {WEIGHT_MAX:.3g} in "
                         "magnitude)", param="model")
