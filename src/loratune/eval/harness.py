"""loratune as an lm-evaluation-harness model (`pip install 'loratune[harness]'`).

    python -m loratune.eval.harness run --model loratune \\
        --model_args model=smollm2-135m-instruct,adapter=runs/x/adapter,quantize=nf4 \\
        --tasks my_task --include_path my_tasks/

`python -m loratune.eval.harness` is lm_eval's own command line with the model `loratune`
registered (importing this module registers it; in Python: `import loratune.eval.harness`
then `lm_eval.simple_evaluate(model="loratune", ...)`). model_args: model (embedded name, HF
folder or .gguf), adapter (folders joined by ':' are stacked), quantize (nf4 / fp4: our 4-bit
base), device, dtype, batch_size, max_length. Models load with `loratune.models.load_model`
and score with `eval.loglik` (the context's cache reused over its continuations).
"""

from __future__ import annotations

from collections import defaultdict

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - the message is the point
    raise ImportError("loratune's lm-evaluation-harness model needs lm-eval: "
                      "pip install 'loratune[harness]'") from None

from loratune.config import DEFAULT_MODEL, ModelConfig
from loratune.eval.generate import generate_text
from loratune.eval.loglik import score_items
from loratune.eval.tasks.perplexity import score_windows, windows

DEFAULT_MAX_LENGTH = 2048


def load(model: str, adapter: str | None, quantize: str | None, device: str, dtype: str):
    """The base through our loader (4-bit when `quantize`), adapters stacked and active."""
    from loratune.adapters import load_adapter, set_active
    from loratune.models import load_model

    cfg = ModelConfig(name=model, device=device, dtype=dtype,
                      quantization={"type": quantize} if quantize else None)
    lm, tok = load_model(cfg)
    names = []
    for i, folder in enumerate(filter(None, (adapter or "").split(":"))):
        load_adapter(lm, folder, f"harness{i}", tokenizer=tok)
        names.append(f"harness{i}")
    if names:
        set_active(lm, names)
        lm.requires_grad_(False)
    return lm, tok


@register_model("loratune")
class LoratuneLM(TemplateLM):
    def __init__(self, model: str = DEFAULT_MODEL, adapter: str | None = None,
                 quantize: str | None = None, device: str = "cpu", dtype: str = "float32",
                 batch_size: int | str = 16, max_length: int | None = None, **_ignored) -> None:
        super().__init__()
        self.model, self.tokenizer = load(model, adapter, quantize, device or "cpu", dtype)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        context = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = int(max_length) if max_length else min(context or DEFAULT_MAX_LENGTH,
                                                                 DEFAULT_MAX_LENGTH)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """model_args win over lm_eval's own flags; lm_eval's --device (cuda:0 unless given)
        falls back to the CPU when torch sees no CUDA, as its HF model does. A device in
        model_args is taken as it is (an error if missing)."""
        import torch

        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            extra["device"] = "cpu"
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string or ""),
                                       additional_config)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        if add_special_tokens is None:  # the tokenizer's default, unless the BOS is written out
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """Requests sharing a context are one item: the context runs once for all of them."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            keep = self.max_length - len(cont)  # the context's tail that fits the window
            groups[tuple(ctx[-keep:] if keep > 0 else ctx[-1:])].append(i)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for ctx, members in groups.items():
            conts = [requests[i][2] for i in members]
            empty = [i for i, c in zip(members, conts) if not c]
            for i in empty:
                out[i] = (0.0, True)
            scored = score_items(self.model, [(list(ctx), [c for c in conts if c])],
                                 self.batch_size)[0]
            for i, s in zip([i for i in members if i not in empty], scored):
                out[i] = (s.logprob, s.greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood after the prefix token, in windows of max_length."""
        out = []
        for (text,) in [r.args for r in requests]:
            ids = [self.prefix_token_id, *self.tok_encode(text)]
            spans = windows(len(ids), self.max_length, self.max_length - 1)
            logps = score_windows(self.model, [(ids[b:e], f - b) for b, e, f in spans],
                                  self.batch_size)
            out.append(float(sum(lp.sum() for lp in logps)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, kwargs in [r.args for r in requests]:
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0) or 0.0)
            sample = bool(kwargs.get("do_sample", False)) and temperature > 0
            text = generate_text(self.model, self.tokenizer, [context],
                                 int(kwargs.get("max_gen_toks", 256)), 1, do_sample=sample,
                                 temperature=temperature if sample else 1.0)[0]
            cut = min((i for i in (text.find(s) for s in until if s) if i >= 0),
                      default=len(text))
            out.append(text[:cut])
        return out


def main() -> None:
    """lm_eval's command line, with `--model loratune` available."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
