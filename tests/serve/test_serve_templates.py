"""Each served adapter is prompted with the chat template it was trained with (its folder's
chat_template.jinja, data.template), the base with the tokenizer's own: side by side in one
server, in one batch, for an adapter loaded on demand too; a composition of adapters trained
with different templates is refused naming them."""

import threading

import pytest
from fastapi.testclient import TestClient

from loratune.data.templates import TEMPLATES, store_template
from loratune.eval.generate import prompt_ids
from loratune.serve.engine import Engine
from loratune.serve.pool import AdapterPool
from test_serve_api import BASE, EN, LOCAL, _save_lora, assert_error, chat, reference
from tiny import tiny_llama

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def served(tmp_path_factory, smol_tokenizer):
    """(client, engine, prompts seen by the engine, adapter dir): adapters 'tools'
    (chatml_tools), 'zeph' and 'zeph2' (zephyr), 'plain' (none); 'late' (zephyr) only under
    more/, registered through the API."""
    root = tmp_path_factory.mktemp("templated")
    for seed, (name, template) in enumerate([("tools", "chatml_tools"), ("zeph", "zephyr"),
                                             ("zeph2", "zephyr"), ("plain", None),
                                             ("more/late", "zephyr")], start=1):
        _save_lora(smol_tokenizer, root / name, name.split("/")[-1], seed)
        store_template(root / name, template)
    model = tiny_llama(vocab=len(smol_tokenizer))
    model.config.max_position_embeddings = 256   # the tools prompt is 175 tokens (rotary: no table)
    engine = Engine(model, smol_tokenizer,
                    AdapterPool(root, max_adapters=4), base_name=BASE, max_batch=4,
                    max_prompt_tokens=256, max_completion_tokens=16).start()
    seen, submit = [], engine.submit

    def recording(request):
        seen.append(smol_tokenizer.decode(request.prompt_ids))
        return submit(request)

    engine.submit = recording
    from loratune.serve.api import build_app

    with TestClient(build_app(engine), base_url=LOCAL) as client:
        yield client, engine, seen, root
    engine.stop()


def rendered(tok, template: str | None) -> list[int]:
    """EN's prompt ids under a stored template's text (None: the tokenizer's own)."""
    if template is None:
        return prompt_ids(tok, EN)
    own = tok.chat_template
    try:
        tok.chat_template = TEMPLATES[template]
        return prompt_ids(tok, EN)
    finally:
        tok.chat_template = own


def test_adapters_of_different_templates_side_by_side_in_one_batch(served, smol_tokenizer):
    client, engine, seen, _ = served
    models = {BASE: None, "tools": "chatml_tools", "zeph": "zephyr", "plain": None}
    answers, seen[:] = {}, []
    threads = [threading.Thread(target=lambda m=m: answers.__setitem__(m, chat(client, m)))
               for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    prompts = sorted(seen)
    assert prompts == sorted(smol_tokenizer.decode(rendered(smol_tokenizer, t))
                             for t in models.values())
    assert sum(p.startswith("<|user|>\n") for p in prompts) == 1       # zeph's only
    assert sum("SmolLM" in p for p in prompts) == 2                    # base and plain
    for model, template in models.items():
        assert answers[model].status_code == 200, answers[model].text
        text = answers[model].json()["choices"][0]["message"]["content"]
        expected = reference(engine, rendered(smol_tokenizer, template), model)
        assert text == expected.text, model


def test_an_adapter_loaded_on_demand_brings_its_template(served, smol_tokenizer):
    client, _, seen, root = served
    resp = client.post("/v1/adapters/load", json={"name": "late", "path": str(root / "more" /
                                                                             "late")})
    assert resp.status_code == 200, resp.text
    seen[:] = []
    assert chat(client, "late").status_code == 200
    assert seen == [smol_tokenizer.decode(rendered(smol_tokenizer, "zephyr"))]


def test_tools_follow_the_adapters_template_not_the_base(served):
    """chatml_tools renders the tools and reads <tool_call>: its adapter takes a tools request;
    the base (SmolLM2's plain chatml) still refuses one."""
    client, _, seen, _ = served
    seen[:] = []
    body = {"messages": EN, "tools": [WEATHER], "max_tokens": 4, "temperature": 0}
    ok = client.post("/v1/chat/completions", json={"model": "tools", **body})
    assert ok.status_code == 200, ok.text
    assert "<tools>" in seen[-1] and "get_weather" in seen[-1]
    err = assert_error(client.post("/v1/chat/completions", json={"model": BASE, **body}), 400)
    assert "tool" in err["message"]


def test_a_composition_of_different_templates_is_refused_by_name(served):
    client, _, seen, _ = served
    seen[:] = []
    err = assert_error(chat(client, "tools:0.5+zeph:0.5"), 400)
    assert "tools (chat_template.jinja: 'chatml_tools')" in err["message"], err
    assert "zeph (chat_template.jinja: 'zephyr')" in err["message"] and err["param"] == "model"
    assert not seen
    assert chat(client, "zeph:0.5+zeph2:0.5").status_code == 200       # one template: fine
    assert seen[-1].startswith("<|user|>\n")
