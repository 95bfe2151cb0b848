"""A prefix adapter saved for another model whose layers x kv heads x head_dim happen to give the
same width per virtual token (2 x 2 x 8 = 4 x 1 x 8): its file says so (num_layers, token_dim,
num_attention_heads, as PEFT writes them), and it is refused naming the field, not served with
its keys and values split across the wrong layers and heads."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loratune.adapters import AdapterError, add_adapter, load_adapter, save_adapter
from loratune.config import PrefixConfig
from loratune.serve.pool import read_lora
from loratune.serve.types import BadAdapter
from tiny import tiny_llama


def _four_layers_one_kv_head():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def other_models_prefix(tmp_path):
    other = _four_layers_one_kv_head()
    add_adapter(other, PrefixConfig(num_virtual_tokens=3), "p")
    save_adapter(other, tmp_path / "p", "p")
    return tmp_path / "p"


def test_serving_refuses_another_models_prefix(other_models_prefix):
    with pytest.raises(BadAdapter, match=r"adapter_config.json: num_layers is 4; this model has 2"):
        read_lora("p", other_models_prefix, tiny_llama())


def test_loading_refuses_another_models_prefix(other_models_prefix):
    with pytest.raises(AdapterError, match=r"adapter_config.json: num_layers is 4; this model "
                                           r"has 2"):
        load_adapter(tiny_llama(), other_models_prefix, "p")
