"""Serving images (issue 29 item 4): image parts in /v1/chat/completions, rows with and without
images and with different adapters (language side, vision side) in one batch, each equal to the
model's own generate() token for token in fp32; a failed image request ends alone."""

import base64
import contextlib
import io
import json
import os
import re

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from vision_models import (tiny_gemma3, tiny_idefics3, tiny_llava, tiny_llava_next,
                           tiny_qwen2_5_vl, tiny_smolvlm)

from loratune.adapters import (add_adapter, delete_adapter, disable_adapters, save_adapter,
                               set_active)
from loratune.config import LoraConfig, ModelConfig
from loratune.eval.generate import prompt_ids
from loratune.models import load_model
from loratune.serve.api import build_app
from loratune.serve.engine import Engine
from loratune.serve.image_prompt import ImagePrompt, ImageSource, image_prompt
from loratune.serve.pool import AdapterPool
from loratune.serve.slot_batch import SlotBatch
from loratune.serve.types import GenerationRequest, SamplingParams, ServeError
from tiny import tiny_llama

LOCAL = "http://127.0.0.1:8000"
STEPS = 8
# Qwen2.5-VL: multimodal RoPE; Idefics3: tiles; Gemma 3: sliding layers (the dynamic cache)
# and image tokens attending both ways; LLaVA-NeXT: anyres tiles, image_sizes; LLaVA-1.5 and
# SmolVLM: the families the docs name as served
BUILDERS = {"qwen2_5_vl": tiny_qwen2_5_vl, "idefics3": tiny_idefics3, "gemma3": tiny_gemma3,
            "llava_next": tiny_llava_next, "llava": tiny_llava, "smolvlm": tiny_smolvlm}
# adapter -> (its targets, the spread of its B): the language model, the vision tower, and a
# second vision adapter that test_a_failed_image_request_ends_alone makes overflow
ADAPTERS = {"lang": ("language", 0.5), "vis": ("vision", 0.5), "huge": ("vision", 0.5)}


def picture(colour, size):
    """A disc in the opposite colour on `colour`: image tokens that differ from each other
    (a plain picture would hide attention among them, Gemma 3's both-ways one)."""
    image = Image.new("RGB", size, colour)
    w, h = size
    ImageDraw.Draw(image).ellipse([w // 4, h // 5, 3 * w // 4, 4 * h // 5],
                                  fill=tuple(255 - c for c in colour))
    return image


def user(text, images=0):
    parts = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts if images else text}]


def prompts(tok):
    """Three image prompts (one with two images) and a text prompt."""
    red, green, blue = picture((200, 20, 20), (40, 30)), picture((20, 200, 20), (56, 56)), \
        picture((20, 20, 200), (28, 28))
    text = prompt_ids(tok, user("hello there"))
    return [image_prompt(tok, user("colour?", 1), [red]),
            image_prompt(tok, user("what shape is this?", 1), [green]),
            image_prompt(tok, user("compare them", 2), [blue, green]),
            ImagePrompt(text, 0, {})]


def generate(model, prompt: ImagePrompt) -> list[int]:
    """The model's own greedy continuation, with the inputs its processor gives (Qwen2-VL's
    kind takes mm_token_type_ids: its 3-D positions)."""
    ids = torch.tensor([prompt.ids])
    extra = dict(prompt.inputs)
    if prompt.images and hasattr(model.model, "get_rope_index"):
        extra["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    out = model.generate(ids, **extra, max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def last_logits(model, prompt: ImagePrompt, **drop) -> torch.Tensor:
    """The model's own forward on the prompt: its last token's logits (`drop`: inputs left
    out, to show they matter)."""
    ids = torch.tensor([prompt.ids])
    extra = {k: v for k, v in prompt.inputs.items() if k not in drop}
    if prompt.images and hasattr(model.model, "get_rope_index"):
        extra["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    return model(input_ids=ids, **extra).logits[0, -1]


def served(tmp_path_factory, family):
    """A tiny VLM of `family`, its adapters on disk and the greedy reference of every
    (prompt, adapter)."""
    model_dir = BUILDERS[family](tmp_path_factory.mktemp(family))
    adapters = tmp_path_factory.mktemp(f"{family}_adapters")
    model, tok = load_model(ModelConfig(name=str(model_dir)))
    for seed, (name, (target, std)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=target), name)
        for mod in model.modules():
            if name in getattr(mod, "adapters", {}):
                torch.nn.init.normal_(mod.adapters[name].lora_B, std=std)
        save_adapter(model, adapters / name, name)
    cases = prompts(tok)
    refs = {}
    with torch.no_grad():
        for name in [None, "lang", "vis"]:
            ctx = disable_adapters(model) if name is None else contextlib.nullcontext()
            if name:
                set_active(model, [name])
            with ctx:
                for j, p in enumerate(cases):
                    refs[(j, name)] = generate(model, p)
                    refs[("logits", j, name)] = last_logits(model, p)
                    if "token_type_ids" in p.inputs:
                        refs[("causal", j, name)] = last_logits(model, p, token_type_ids=0)
    for name in ADAPTERS:
        delete_adapter(model, name)
    return model, tok, adapters, cases, refs


@pytest.fixture(scope="module", params=list(BUILDERS))
def vlm(request, tmp_path_factory):
    return served(tmp_path_factory, request.param)


def engine_on(vlm, **kw):
    model, tok, adapters, _, _ = vlm
    engine = Engine(model, tok, AdapterPool(adapters, max_adapters=4), base_name="vlm",
                    max_completion_tokens=32, **kw)
    engine.eos = set()   # random weights: every request runs to max_tokens
    return engine


def submit(engine, prompt: ImagePrompt, adapter=None):
    return engine.submit(GenerationRequest(
        list(prompt.ids), {adapter: 1.0} if adapter else {},
        SamplingParams(max_tokens=STEPS, temperature=0.0), images=prompt.images,
        image_inputs=prompt.inputs))


def run_out(engine, handles):
    while engine.running or engine.queue:
        engine.step()
    return [h.result() for h in handles]


ROWS_FIRST = [(0, None), (1, "lang"), (2, "vis"), (3, "vis")]
ROWS_LATER = [(1, "vis"), (3, "lang"), (0, None)]


@pytest.mark.parametrize("loop", ["slots", "dynamic", "graph-steps"])
def test_rows_with_and_without_images_share_a_batch_and_equal_generate(vlm, loop):
    """Four rows prefilled together (images or not, base / language / vision adapters), three
    more joining while they decode: every reply equals generate() token for token; on the slot
    cache, the dynamic cache and the CUDA-graph runner's static steps (replayed eagerly)."""
    model, _, _, cases, refs = vlm
    degenerate(model)
    engine = engine_on(vlm, kv_cache="dynamic" if loop == "dynamic" else "auto")
    if engine.kv_cache != ("dynamic" if loop == "dynamic" else "slots"):
        assert model.config.model_type == "gemma3"     # sliding-window layers
        pytest.skip(f"the slot cache refuses this model: {engine.kv_cache_note}")
    if loop == "graph-steps":
        engine.batch = SlotBatch(model, engine.cache_key, engine.row_slots, engine.device,
                                 rows=engine.max_batch, columns=engine.columns(),
                                 graphs="eager", lock=engine.pool.lock, images=engine.images)
    first = [submit(engine, cases[j], a) for j, a in ROWS_FIRST]
    for _ in range(3):
        engine.step()
    later = [submit(engine, cases[j], a) for j, a in ROWS_LATER]
    results = run_out(engine, first + later)
    assert engine.counts["prefills"] == 2
    if loop == "graph-steps":
        assert engine.batch.graphs is not None and engine.batch.graphs.recorded
    for (j, adapter), got in zip(ROWS_FIRST + ROWS_LATER, results):
        assert got.error is None and got.token_ids == refs[(j, adapter)], (j, adapter)
    assert engine.pool.pins == {}


def degenerate(model):
    if model.config.model_type == "gemma3":
        pytest.skip("the tiny Gemma 3 answers one token (20) whatever it is given: its replies "
                    "tell nothing apart; test_joint_prefill_logits_equal_the_models_forward "
                    "checks it")


def test_joint_prefill_logits_equal_the_models_forward(vlm):
    """One prefill of rows with and without images and different adapters: each row's logits
    equal the model's own forward on that row alone (1e-5, fp32). For Gemma 3 this is the check
    of its image tokens attending both ways: without token_type_ids the logits differ."""
    model, _, _, cases, refs = vlm
    engine = engine_on(vlm)
    seen = []
    prefill = engine.batch.prefill
    engine.batch.prefill = lambda seqs: seen.append(prefill(seqs)) or seen[-1]
    rows = [(0, "vis"), (1, None), (3, "lang"), (2, "lang"), (2, None)]
    handles = [submit(engine, cases[j], a) for j, a in rows]
    engine.step()
    assert len(seen) == 1 and seen[0].shape[0] == len(rows)
    for i, (j, adapter) in enumerate(rows):
        torch.testing.assert_close(seen[0][i], refs[("logits", j, adapter)], rtol=0, atol=1e-5)
        if ("causal", j, adapter) in refs:
            assert (refs[("causal", j, adapter)] - refs[("logits", j, adapter)]).abs().max() > 1e-3
    for h in handles:
        h.cancel()
    run_out(engine, [])


def test_the_references_tell_the_adapters_apart(vlm):
    """The equality above means something: the vision adapter changes answers about images
    and leaves a text prompt alone; the language adapter changes both."""
    model, _, _, _, refs = vlm
    degenerate(model)
    for j in (1, 2):    # (Qwen's 40x30 picture of prompt 0 is one token: no test leans on it)
        assert refs[(j, "vis")] != refs[(j, None)]
    assert refs[(3, "vis")] == refs[(3, None)]
    assert refs[(0, "lang")] != refs[(0, None)] and refs[(3, "lang")] != refs[(3, None)]


def test_a_failed_image_request_ends_alone(vlm):
    """Mid-run, three image requests join: one with NaN pixels (400), one whose vision adapter
    overflows (422; its slot freed and the adapter read again on its next use), one good. The
    running row and the good one equal generate(); the failed ones hold nothing afterwards.
    (The overflow is a hook on the projector turning the features of "huge"'s slot to inf: the
    pool refuses adapter values large enough to overflow by themselves.)"""
    model, tok, _, cases, refs = vlm
    degenerate(model)
    engine = engine_on(vlm)

    def overflow(module, args, out):
        return out * float("inf") if engine.row_slots.uniform == \
            engine.pool.live.get("huge", -1) else out

    projector = model.get_submodule(tok.image_encoder.family.projector)
    hook = projector.register_forward_hook(overflow)
    try:
        running = submit(engine, cases[1], "lang")
        engine.step()
        nan = ImagePrompt(cases[0].ids, 1, {k: v.clone() for k, v in cases[0].inputs.items()})
        nan.inputs["pixel_values"].view(-1)[0] = float("nan")
        bad, huge = submit(engine, nan, "vis"), submit(engine, cases[0], "huge")
        good = submit(engine, cases[2], "vis")
        results = run_out(engine, [running, bad, huge, good])
    finally:
        hook.remove()
    assert results[0].token_ids == refs[(1, "lang")] and results[3].token_ids == refs[(2, "vis")]
    assert results[1].finish_reason == "error" and results[1].status == 400
    assert "pixel_values hold inf or NaN" in results[1].error
    assert results[2].status == 422 and "vision tower produced non-finite" in results[2].error
    assert engine.pool.pins == {} and "huge" not in engine.pool.loaded()
    assert engine.counts["prefills"] == 2 and not engine.running
    again = run_out(engine, [submit(engine, cases[1], "vis")])
    assert again[0].token_ids == refs[(1, "vis")]


def test_image_tokens_count_toward_the_prompt_budget(vlm):
    _, _, _, cases, _ = vlm
    engine = engine_on(vlm, max_prompt_tokens=len(cases[2].ids) - 1)
    with pytest.raises(ServeError, match=rf"the prompt has {len(cases[2].ids)} tokens \(\d+ of "
                       r"them image tokens, for its 2 image\(s\)\); .* at most"):
        submit(engine, cases[2])


def test_the_prompt_is_the_generation_prompt_with_each_image_widened(tmp_path):
    """Qwen2.5-VL: the served prompt with each image's run of <|image_pad|> collapsed to one is
    exactly the chat template's generation prompt (what generate() is given for text)."""
    model, tok = load_model(ModelConfig(name=str(tiny_qwen2_5_vl(tmp_path))))
    two = image_prompt(tok, user("compare them", 2), [picture((200, 0, 0), (28, 28)),
                                                      picture((0, 0, 200), (56, 56))])
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    collapsed = [t for i, t in enumerate(two.ids) if t != pad or two.ids[i - 1] != pad]
    assert collapsed == prompt_ids(tok, user("compare them", 2))
    assert two.ids.count(pad) == 1 + 4 and two.inputs["image_grid_thw"].tolist() == [
        [1, 2, 2], [1, 4, 4]]
    # A conversation with an answer in its history: the prompt is the whole history plus
    # the generation prompt (a cut at the first labelled token ended it at the first answer).
    chat = [*user("compare them", 2), {"role": "assistant", "content": "red and blue"},
            *user("which is larger?")]
    later = image_prompt(tok, chat, [picture((200, 0, 0), (28, 28)), picture((0, 0, 200), (56, 56))])
    collapsed = [t for i, t in enumerate(later.ids) if t != pad or later.ids[i - 1] != pad]
    assert collapsed == prompt_ids(tok, chat)


# -- HTTP -------------------------------------------------------------------------------------
def png(colour=(200, 20, 20), size=(40, 30)) -> bytes:
    out = io.BytesIO()
    picture(colour, size).save(out, format="PNG")
    return out.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def ask(client, url, model="vlm", text="colour?", **extra):
    urls = [url] if isinstance(url, str) else url
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": [
            *content, {"type": "text", "text": text}]}],
        "temperature": 0, "max_tokens": STEPS, **extra})


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return served(tmp_path_factory, "qwen2_5_vl")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "red.png").write_bytes(png())
    (root / "sub").mkdir()
    (root / "sub" / "big.png").write_bytes(png(size=(80, 80)))
    (root / "broken.png").write_bytes(png()[:40])
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(png())
    os.symlink(outside / "secret.png", root / "link.png")
    return root


@pytest.fixture(scope="module")
def client(qwen, image_root):
    engine = engine_on(qwen).start()
    app = build_app(engine, images=ImageSource(root=image_root, max_pixels=64 * 64))
    with TestClient(app, base_url=LOCAL) as c:
        yield c
    engine.stop()


def text(tok, ids) -> str:
    """The reply the server sends for `ids`: a character the max_tokens cut split is dropped."""
    return tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_data_url_and_path_under_the_root_answer_as_generate(client, qwen):
    """The same image as a data: URL, a path under --image-root and a file: URL there: the
    reply is generate()'s on the prompt with that image (PNG is lossless: the fixture's red
    picture), for the base and an adapter."""
    _, tok, _, cases, refs = qwen
    for adapter in [None, "lang"]:
        for url in [data_url(png()), "red.png", "file://red.png"]:
            resp = ask(client, url, model=adapter or "vlm")
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["usage"]["prompt_tokens"] == len(cases[0].ids)
            assert body["choices"][0]["message"]["content"] == text(tok, refs[(0, adapter)])


def test_two_images_in_order_and_streamed(client, qwen):
    """Two image parts are read in order (prompt 2: blue 28x28, then green 56x56); streamed,
    the chunks add up to generate()'s answer."""
    _, tok, _, _, refs = qwen
    urls = [data_url(png((20, 20, 200), (28, 28))), data_url(png((20, 200, 20), (56, 56)))]
    want = text(tok, refs[(2, "vis")])
    resp = ask(client, urls, model="vis", text="compare them")
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == want
    swapped = ask(client, urls[::-1], model="vis", text="compare them")
    assert swapped.json()["choices"][0]["message"]["content"] != want
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "vis", "stream": True, "temperature": 0, "max_tokens": STEPS,
            "messages": [{"role": "user", "content": [
                *[{"type": "image_url", "image_url": {"url": u}} for u in urls],
                {"type": "text", "text": "compare them"}]}]}) as stream:
        chunks = [json.loads(line[6:]) for line in stream.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == want


@pytest.mark.parametrize("url, words", [
    ("../outside/secret.png", "outside --image-root"),
    ("/etc/hostname", "outside --image-root"),
    ("link.png", "outside --image-root"),
    ("missing.png", "image file not found"),
    ("broken.png", "not a readable image"),
    ("sub/big.png", "80x80 is too large; expected at most 4096 pixels"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("https://example.com/cat.png", "not fetched by this server (start it with "
                                    "--allow-remote-images)"),
    ("ftp://example.com/cat.png", "'ftp://example.com/cat.png' is not read"),
    ("data:text/plain,hello", "'data:text/plain' is not read; expected a data:image/"),
])
def test_unusable_image_parts_are_400_naming_the_part(client, url, words):
    resp = ask(client, url)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "messages[0].content[0]"
    assert error["message"].startswith("request: messages[0].content[0]") or \
        error["message"].startswith("messages[0].content[0]")
    assert words in error["message"]


def test_paths_are_refused_without_an_image_root(qwen):
    engine = engine_on(qwen)
    with TestClient(build_app(engine), base_url=LOCAL) as c:
        resp = ask(c, "red.png")
    assert resp.status_code == 400 and "--image-root, and this server has none" in \
        resp.json()["error"]["message"]


def test_remote_images_are_fetched_only_when_allowed(qwen, monkeypatch):
    """--allow-remote-images fetches an http(s) URL (here a stand-in for urlopen: nothing goes
    to the network) and reads it with the same checks; the answer is the data: URL's."""
    import loratune.serve.image_prompt as image_prompt_module

    asked = []

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def open_url(url, timeout):
        asked.append(url)
        return Response(png())

    monkeypatch.setattr(image_prompt_module, "open_url", open_url)
    monkeypatch.setattr(image_prompt_module, "host_addresses", lambda host: ["93.184.215.14"])
    engine = engine_on(qwen).start()
    try:
        with TestClient(build_app(engine, images=ImageSource(allow_remote=True)),
                        base_url=LOCAL) as c:
            remote = ask(c, "https://example.com/red.png")
            inline = ask(c, data_url(png()))
    finally:
        engine.stop()
    assert asked == ["https://example.com/red.png"]
    assert remote.status_code == 200 and remote.json()["choices"] == inline.json()["choices"]


def test_a_text_model_given_an_image_part_is_400_naming_it(smol_tokenizer):
    engine = Engine(tiny_llama(vocab=len(smol_tokenizer)), smol_tokenizer, AdapterPool(None),
                    base_name="tiny-text")
    with TestClient(build_app(engine), base_url=LOCAL) as c:
        resp = ask(c, data_url(png()), model="tiny-text")
    assert resp.status_code == 400
    assert "model 'tiny-text' is a text model; it takes no image parts" in \
        resp.json()["error"]["message"]


def test_too_many_image_tokens_is_400_with_the_count(qwen):
    engine = engine_on(qwen, max_prompt_tokens=30)
    with TestClient(build_app(engine), base_url=LOCAL) as c:
        resp = ask(c, data_url(png(size=(56, 56))))    # 4x4 patches, merged 2x2: 4 tokens
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == (
        "the prompt has 34 tokens (4 of them image tokens, for its 1 image(s)); this server "
        "takes at most 30 (--max-prompt-tokens)")


def test_serve_options_reach_the_image_source(tmp_path):
    """--image-root, --allow-remote-images, --image-max-pixels as `loratune serve` reads
    them; a root that is not a folder is refused at startup, naming the flag."""
    from loratune.config.commands import ServeConfig
    from loratune.serve.api import check_startup, image_source

    cfg = ServeConfig(image_root=str(tmp_path), allow_remote_images=True, image_max_pixels=99)
    assert image_source(cfg) == ImageSource(root=tmp_path, allow_remote=True, max_pixels=99)
    assert image_source(ServeConfig()) == ImageSource()
    with pytest.raises(ValueError, match="--image-root .*missing: no such folder"):
        check_startup(ServeConfig(image_root=str(tmp_path / "missing")))


def test_the_context_is_the_text_models(qwen):
    """A VLM's config keeps max_position_embeddings in its text config: prompt plus max_tokens
    beyond it is refused, not run past the model's positions."""
    _, _, _, cases, _ = qwen
    engine = engine_on(qwen)
    engine.max_completion_tokens = 1024
    assert engine.context == 512
    with pytest.raises(ServeError, match="exceeds the model's context of 512 tokens"):
        engine.submit(GenerationRequest(list(cases[0].ids), {}, SamplingParams(max_tokens=500),
                                        images=1, image_inputs=cases[0].inputs))


@pytest.mark.parametrize("family, why", [
    ("qwen3_vl", "qwen3_vl adds vision features into early text layers (deepstack)"),
    ("mllama", "mllama takes images through cross-attention layers"),
])
def test_families_whose_images_cannot_share_the_prefill_are_refused_by_name(
        family, why, tmp_path):
    import vision_models

    model, tok = load_model(ModelConfig(
        name=str(getattr(vision_models, f"tiny_{family}")(tmp_path / family))))
    engine = Engine(model, tok, AdapterPool(None), base_name=family)
    prompt = image_prompt(tok, user("colour?", 1), [picture((200, 20, 20), (40, 30))])
    with pytest.raises(ServeError, match=re.escape(f"model '{family}' takes no image parts "
                                                   f"here: {why}")):
        submit(engine, prompt)
