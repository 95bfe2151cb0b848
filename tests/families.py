"""Tiny random models of the families people fine-tune, each built from its real config class,
with a tokenizer carrying the family's special tokens and its published chat template.

    from families import FAMILIES, build_family, save_family
    @pytest.mark.parametrize("name", FAMILIES)
    def test_x(name, tmp_path):
        folder = save_family(name, tmp_path / name)      # config, safetensors, tokenizer, template,
                                                         # generation_config (the family's eos list)

The templates are the model makers' published texts (tests/fixtures/templates/<name>.jinja).
The tokenizers are small (a few hundred tokens) but of the family's kind: byte-level BPE with
the family's pre-tokenizer regex (Llama 3, Qwen, Phi-4-mini) or SentencePiece-style BPE with
byte fallback and "▁" for spaces (Mistral, Gemma, Phi-3/3.5). Models: hidden 32, 2 layers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratune.data import IGNORE

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"

# A small corpus the tokenizers' merges are learned from (any text still encodes: byte-level
# or byte fallback).
CORPUS = [
    "Repeat the word apple. apple apple apple. river stone cloud green metal piano tiger",
    "You are a helpful assistant. Be brief. Hello! How are you? I am fine, thank you.",
    "What is the capital of France? Paris is the capital of France. The answer is 42.",
    "Let me think step by step. First, add two and three. Then the result is five.",
    "Translate to French: good morning. Bonjour. Set a timer for 25 minutes: timer(minutes=25)",
    "system user assistant model question answer think reasoning instruction input output",
]

# Pre-tokenizer regexes of the byte-level families (as in their tokenizer.json files).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
O200K_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
               r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Family:
    """What makes a family: its config class and shape quirks, tokenizer kind and tokens."""

    name: str
    model_type: str                  # transformers' model_type (the config class)
    kind: str                        # "bpe" (byte-level) or "spm" (SentencePiece-style BPE)
    specials: tuple[str, ...]        # special tokens, in id order, before the learned vocab
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    generation_eos: tuple[str, ...]  # generation_config.eos_token_id, as tokens
    end_of_turn: str                 # the token that closes an assistant turn in the template
    assistant_header: str            # the template's text right before an answer
    added: tuple[str, ...] = ()      # added tokens that are not special (Qwen3's <think>)
    add_bos: bool = False            # the tokenizer prepends bos when encoding
    regex: str | None = None         # byte-level pre-tokenizer split
    spm_style: str = "metaspace"     # "metaspace" (Mistral v0.3), "legacy" (Llama 2/Phi-3), "gemma"
    system_role: bool = True         # the template renders a system message itself
    tie: bool = False
    fused: bool = False              # qkv_proj / gate_up_proj (Phi-3)
    config: dict = field(default_factory=dict)  # config kwargs beyond the common tiny shape

    @property
    def template(self) -> str:
        return (TEMPLATES / f"{self.name}.jinja").read_text()


_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                    "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>")
_QWEN_ADDED = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
               "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
_MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]",
                     "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                     "[/TOOL_RESULTS]", "[control_8]", "[control_9]")
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]",
                   "<start_of_turn>", "<end_of_turn>")
_PHI3_SPECIALS = ("<unk>", "<s>", "</s>")
_PHI3_ADDED_SPECIALS = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
                        "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>",
                        "<|placeholder5|>", "<|placeholder6|>", "<|user|>")
_PHI4_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>", "<|tool_call|>",
                  "<|/tool_call|>", "<|tool_response|>", "<|tag|>")

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                "rope_theta": 500000.0}


def _longrope(rotary_dim: int) -> dict:
    half = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0,
            "long_factor": [1.0 + 0.25 * i for i in range(half)],
            "short_factor": [1.0 + 0.05 * i for i in range(half)]}


FAMILY_SPECS: dict[str, Family] = {f.name: f for f in [
    Family("llama3_1", "llama", "bpe", _LLAMA3_SPECIALS, bos="<|begin_of_text|>",
           eos="<|eot_id|>", pad=None, unk=None, add_bos=True, regex=LLAMA3_REGEX,
           generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), end_of_turn="<|eot_id|>",
           assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
           config={"rope_parameters": dict(_LLAMA3_ROPE)}),
    Family("llama3_2", "llama", "bpe", _LLAMA3_SPECIALS, bos="<|begin_of_text|>",
           eos="<|eot_id|>", pad=None, unk=None, add_bos=True, regex=LLAMA3_REGEX, tie=True,
           generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), end_of_turn="<|eot_id|>",
           assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
           config={"rope_parameters": dict(_LLAMA3_ROPE, factor=32.0)}),
    Family("qwen2_5", "qwen2", "bpe", _QWEN_SPECIALS, bos=None, eos="<|im_end|>",
           pad="<|endoftext|>", unk=None, added=_QWEN_ADDED, regex=QWEN2_REGEX, tie=True,
           generation_eos=("<|im_end|>", "<|endoftext|>"), end_of_turn="<|im_end|>",
           assistant_header="<|im_start|>assistant\n",
           config={"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                   "use_sliding_window": False}),
    Family("qwen3", "qwen3", "bpe", _QWEN_SPECIALS, bos=None, eos="<|im_end|>",
           pad="<|endoftext|>", unk=None,
           added=_QWEN_ADDED + ("<tool_response>", "</tool_response>", "<think>", "</think>"),
           regex=QWEN2_REGEX, tie=True, generation_eos=("<|im_end|>", "<|endoftext|>"),
           end_of_turn="<|im_end|>",
           assistant_header="<|im_start|>assistant\n",
           config={"head_dim": 16, "rope_parameters": {"rope_type": "default",
                                                       "rope_theta": 1000000.0}}),
    Family("mistral_v0_3", "mistral", "spm", _MISTRAL_SPECIALS, bos="<s>", eos="</s>", pad=None,
           unk="<unk>", add_bos=True, spm_style="metaspace", system_role=False,
           generation_eos=("</s>",), end_of_turn="</s>",
           assistant_header="[/INST]",
           config={"sliding_window": None,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    Family("gemma2", "gemma2", "spm", _GEMMA_SPECIALS, bos="<bos>", eos="<eos>", pad="<pad>",
           unk="<unk>", add_bos=True, spm_style="gemma", system_role=False, tie=True,
           generation_eos=("<eos>", "<end_of_turn>"), end_of_turn="<end_of_turn>",
           assistant_header="<start_of_turn>model\n",
           config={"head_dim": 16, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "sliding_window": 16,
                   "hidden_activation": "gelu_pytorch_tanh"}),
    Family("gemma3", "gemma3_text", "spm",
           _GEMMA_SPECIALS + ("<start_of_image>", "<end_of_image>"), bos="<bos>", eos="<eos>",
           pad="<pad>", unk="<unk>", add_bos=True, spm_style="gemma", tie=True,
           generation_eos=("<eos>", "<end_of_turn>"), end_of_turn="<end_of_turn>",
           assistant_header="<start_of_turn>model\n",
           config={"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                   "layer_types": ["sliding_attention", "full_attention"],
                   "hidden_activation": "gelu_pytorch_tanh"}),
    Family("phi3", "phi3", "spm", _PHI3_SPECIALS + _PHI3_ADDED_SPECIALS, bos="<s>",
           eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", spm_style="legacy", fused=True,
           generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"), end_of_turn="<|end|>",
           assistant_header="<|assistant|>\n",
           config={"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    Family("phi3_5", "phi3", "spm", _PHI3_SPECIALS + _PHI3_ADDED_SPECIALS, bos="<s>",
           eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", spm_style="legacy", fused=True,
           generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"), end_of_turn="<|end|>",
           assistant_header="<|assistant|>\n",
           config={"rope_parameters": _longrope(8), "original_max_position_embeddings": 64}),
    Family("phi4_mini", "phi3", "bpe", _PHI4_SPECIALS, bos="<|endoftext|>", eos="<|endoftext|>",
           pad="<|endoftext|>", unk=None, regex=O200K_REGEX, fused=True, tie=True,
           generation_eos=("<|endoftext|>", "<|end|>"), end_of_turn="<|end|>",
           assistant_header="<|assistant|>",
           config={"partial_rotary_factor": 0.75, "rope_parameters": _longrope(6),
                   "original_max_position_embeddings": 64}),
]}

FAMILIES = list(FAMILY_SPECS)


def _learned_vocab(fam: Family):
    """Train merges on CORPUS in the family's pre-tokenization; returns (vocab, merges)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if fam.kind == "bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(fam.regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + 160, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    state = tok.to_str()
    import json
    model = json.loads(state)["model"]
    return model["vocab"], model["merges"]


def _tokenizer_object(fam: Family):
    """The tokenizers.Tokenizer of the family's kind (what its tokenizer.json holds)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, \
        pre_tokenizers, processors

    learned, merges = _learned_vocab(fam)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    vocab: dict[str, int] = {}
    for t in fam.specials:
        vocab[t] = len(vocab)
    if fam.kind == "spm":
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
    for t in sorted(learned, key=learned.get):
        if t not in vocab:
            vocab[t] = len(vocab)
    if fam.kind == "bpe":
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=fam.model_type == "llama"))
        tok.normalizer = normalizers.NFC() if fam.model_type.startswith("qwen") else None
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(fam.regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    else:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=fam.unk,
                                   byte_fallback=True, fuse_unk=True))
        if fam.spm_style == "metaspace":
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                         split=False)
        elif fam.spm_style == "legacy":
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                   normalizers.Replace(" ", "▁")])
        else:  # gemma: spaces become "▁", no dummy prefix
            tok.normalizer = normalizers.Replace(" ", "▁")
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if fam.spm_style != "gemma":
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fam.specials])
    if fam.added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in fam.added])
    if fam.add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B",
            special_tokens=[(fam.bos, tok.token_to_id(fam.bos))])
    elif fam.kind == "bpe":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


@functools.lru_cache(maxsize=None)
def _tokenizer_cached(name: str):
    from transformers import PreTrainedTokenizerFast

    fam = FAMILY_SPECS[name]
    tokens = {k: v for k, v in [("bos_token", fam.bos), ("eos_token", fam.eos),
                                ("pad_token", fam.pad), ("unk_token", fam.unk)] if v}
    return PreTrainedTokenizerFast(tokenizer_object=_tokenizer_object(fam),
                                   chat_template=fam.template, model_max_length=256, **tokens)


def family_tokenizer(name: str):
    """A fresh copy of the family's tokenizer (the build is cached; callers may mutate theirs)."""
    import copy

    return copy.deepcopy(_tokenizer_cached(name))


def family_config(name: str, vocab_size: int, tok=None):
    """The family's config class at a tiny shape (hidden 32, 4 heads / 2 KV heads, 2 layers)."""
    from transformers import AutoConfig

    fam = FAMILY_SPECS[name]
    tok = tok or _tokenizer_cached(name)
    ids = {k: tok.convert_tokens_to_ids(t) if t else None
           for k, t in [("bos_token_id", fam.bos), ("eos_token_id", fam.eos),
                        ("pad_token_id", fam.pad)]}
    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=fam.tie, **ids)
    kwargs.update(fam.config)
    cfg = AutoConfig.for_model(fam.model_type, **kwargs)
    cfg._attn_implementation = "eager"
    return cfg


def build_family(name: str, seed: int = 0):
    """(model, tokenizer): the family's causal LM with random weights, eval mode, float32."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = family_tokenizer(name)
    fam = FAMILY_SPECS[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, len(tok), tok),
                                             dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, pad_token_id=model.config.pad_token_id,
        eos_token_id=[tok.convert_tokens_to_ids(t) for t in fam.generation_eos])
    return model.eval(), tok


def save_family(name: str, folder, seed: int = 0) -> Path:
    """Write the family as a Hugging Face folder (safetensors, config, generation config,
    tokenizer.json with its chat template); returns the folder."""
    folder = Path(folder)
    model, tok = build_family(name, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def family_conversation(system: bool = True) -> list[dict]:
    """A 2-turn chat (optionally with a system message) used to check masking."""
    msgs = [{"role": "system", "content": "You are a helpful assistant. Be brief."}] if system else []
    return msgs + [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "Repeat the word apple."},
        {"role": "assistant", "content": "apple apple apple"},
    ]


def taught(tok, ex) -> list[str]:
    """The decoded runs of an example's labelled tokens: what a masking test says is taught."""
    runs, run = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE:
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs + ([tok.decode(run)] if run else [])


def labels_over_spans(tok, text: str, ids: list[int], spans) -> list[int]:
    """The labels a masking test expects: each token of `ids` (the tokenized `text`) overlapping
    a character span [start, end) is labelled, the final eos too; nothing else."""
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    labels = [t if any(a < e and max(b, a + 1) > s for s, e in spans) else IGNORE
              for t, (a, b) in zip(ids, offsets)]
    if len(ids) > len(offsets):  # eos appended after the text
        labels.append(tok.eos_token_id)
    elif ids[-1] == tok.eos_token_id:
        labels[-1] = tok.eos_token_id
    return labels
