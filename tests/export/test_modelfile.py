"""The Ollama Modelfile beside a GGUF: a Go TEMPLATE giving the family's Jinja prompts, stop
tokens from the generation config, FROM / ADAPTER; and the Go-template renderer it relies on."""

import pytest

from families import FAMILIES, FAMILY_SPECS, build_family, save_family
from loratune.adapters import add_adapter, save_adapter
from loratune.cli import main
from loratune.config import LoraConfig
from loratune.export.gotemplate import render
from loratune.export.modelfile import ollama_template

MSGS = [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"},
        {"Role": "user", "Content": "c"}]


@pytest.mark.parametrize("template,want", [
    # {{- trims the text before, -}} the text after, whitespace and newlines alike
    ("x \n {{- .System -}} \n y", "xSy"),
    ("{{ if .System }}1{{ else if .Messages }}2{{ else }}3{{ end }}", "1"),
    ("{{ if not .System }}1{{ else if eq (len .Messages) 3 }}2{{ else }}3{{ end }}", "2"),
    ("{{ range $i, $m := .Messages }}{{ $i }}{{ .Role }}:{{ $m.Content }};{{ end }}",
     "0user:a;1assistant:b;2user:c;"),
    ("{{- range $i, $m := .Messages }}\n{{- if eq (len (slice $.Messages $i)) 1 }}last={{ "
     ".Content }}{{ end }}\n{{- end }}", "last=c"),
    ('{{- $s := .System }}{{ range .Messages }}{{ $s }}{{ $s = "" }}{{ end }}|', "S|"),
    ('{{ if and .System (ne .System "S") }}1{{ else if or "" .System }}2{{ end }}', "2"),
])
def test_go_template_subset_renders_as_go_does(template, want):
    template = template.replace("{{ range .Messages }}", "{{ range $j, $x := .Messages }}")
    assert render(template, {"System": "S", "Messages": MSGS}) == want


def test_go_template_refuses_what_it_cannot_render():
    with pytest.raises(ValueError, match="unsupported expression: printf"):
        render("{{ printf \"%s\" .System }}", {"System": "S"})
    with pytest.raises(ValueError, match="ends inside a block"):
        render("{{ if .System }}x", {"System": "S"})


WANT = {"llama3_1": "llama3", "llama3_2": "llama3", "qwen2_5": "chatml", "qwen3": "chatml",
        "mistral_v0_3": "mistral", "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3",
        "phi3_5": "phi3", "phi4_mini": "phi4"}


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_gets_a_template_giving_its_jinja_prompts(name):
    _, tok = build_family(name)
    template, how = ollama_template(tok)
    assert how == WANT[name]
    # a longer conversation than the samples it was chosen on, with a system message
    turns = [("user", "Hi there."), ("assistant", "Hello."), ("user", "What is 2+2?"),
             ("assistant", "4."), ("user", "Thanks!")]
    system = "Answer in one word."
    msgs = [{"role": r, "content": c} for r, c in turns]
    if FAMILY_SPECS[name].system_role:
        jinja = tok.apply_chat_template([{"role": "system", "content": system}] + msgs,
                                        tokenize=False, add_generation_prompt=True,
                                        date_string="26 Jul 2024")
    else:  # Gemma 2 and Mistral-style folding done the way their templates fold it
        folded = [dict(m) for m in msgs]
        if name.startswith("gemma"):
            folded[0]["content"] = f"{system}\n\n{folded[0]['content']}"
        else:
            folded[-1]["content"] = f"{system}\n\n{folded[-1]['content']}"
        jinja = tok.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)
    if FAMILY_SPECS[name].add_bos:
        jinja = jinja.removeprefix(tok.bos_token)
    go = render(template, {"System": system, "Messages": [
        {"Role": r, "Content": c} for r, c in turns]})
    assert go == jinja


def test_unknown_chat_template_gets_no_template_and_says_why():
    _, tok = build_family("qwen2_5")
    tok.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    template, how = ollama_template(tok)
    assert template is None and "write a TEMPLATE by hand" in how


def test_export_writes_the_modelfile_beside_the_gguf(tmp_path, capsys):
    folder = save_family("qwen3", tmp_path / "qwen3")
    model, tok = build_family("qwen3")
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path / "ad")
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--model", str(folder), "--adapter", str(tmp_path / "ad"),
                 "--out", str(out), "--type", "f16"]) == 0
    text = (tmp_path / "m.Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./m.gguf" in lines and not any(x.startswith("ADAPTER") for x in lines)
    assert '<|im_start|>assistant' in text and 'TEMPLATE """' in text
    # the generation config's eos list: <|im_end|>, <|endoftext|>
    assert [x for x in lines if x.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"']
    # adapter-only: the base is FROM, the LoRA GGUF the ADAPTER
    assert main(["export", "gguf", "--model", str(folder), "--adapter", str(tmp_path / "ad"),
                 "--adapter-only", "--out", str(tmp_path / "lora.gguf")]) == 0
    lines = (tmp_path / "lora.Modelfile").read_text().splitlines()
    assert f"FROM {folder.resolve()}" in lines and "ADAPTER ./lora.gguf" in lines
    # an existing Modelfile is not replaced without --overwrite
    (tmp_path / "lora.gguf").unlink()
    assert main(["export", "gguf", "--model", str(folder), "--adapter", str(tmp_path / "ad"),
                 "--adapter-only", "--out", str(tmp_path / "lora.gguf")]) == 2
    assert "lora.Modelfile already exists" in capsys.readouterr().err
    assert main(["export", "gguf", "--model", str(folder), "--adapter", str(tmp_path / "ad"),
                 "--adapter-only", "--out", str(tmp_path / "x.gguf"), "--no-modelfile"]) == 0
    assert not (tmp_path / "x.Modelfile").exists()
