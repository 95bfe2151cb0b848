"""generate_chat (used by chat, generate and eval) stops where the model's replies end."""

import torch

from loratune.eval.generate import generate_chat, prompt_ids
from tiny import tiny_llama

CHAT = [[{"role": "user", "content": "Name a colour."}]]


def test_every_eos_of_the_generation_config_stops_a_reply(smol_tokenizer):
    """Gemma ends a turn with <end_of_turn>, Llama 3 with <|eot_id|>: ids of the generation
    config's eos list, not the tokenizer's eos. A reply must stop at any of them."""
    tok = smol_tokenizer
    model = tiny_llama(vocab=len(tok))
    ids = torch.tensor([prompt_ids(tok, CHAT[0])])
    free = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                          do_sample=False, eos_token_id=None,
                          pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    first = free[0]
    assert first != tok.eos_token_id and len(set(free)) > 1  # the reply would go on
    model.generation_config.eos_token_id = [tok.eos_token_id, first]
    answer = generate_chat(model, tok, CHAT, max_new_tokens=6)[0]
    assert answer == tok.decode([first], skip_special_tokens=True).strip()
    model.generation_config.eos_token_id = tok.eos_token_id
    assert generate_chat(model, tok, CHAT, max_new_tokens=6)[0] == \
        tok.decode(free, skip_special_tokens=True).strip()
