"""`loratune serve --tool-parser NAME`: the server reads answers with that parser, not the one
the chat template suggests; a name that is no parser is refused with the choices."""

import pytest

from loratune.cli import main
from tiny import tiny_llama


@pytest.fixture
def served(monkeypatch, smol_tokenizer):
    """Runs `loratune serve ARGS` without a socket; returns the app's state."""
    import uvicorn

    import loratune.models

    state = {}
    monkeypatch.setattr(loratune.models, "load_model",
                        lambda cfg: (tiny_llama(vocab=len(smol_tokenizer)), smol_tokenizer))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: state.update(app=app.state.loratune))
    return state


def test_serve_passes_tool_parser_to_the_app(served):
    assert main(["serve", "--tool-parser", "llama3_json"]) == 0
    assert served["app"].tool_parser == "llama3_json"
    assert main(["serve"]) == 0
    assert served["app"].tool_parser is None       # chosen from the template per request


def test_an_unknown_tool_parser_names_the_choices(served, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--tool-parser", "json"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--tool-parser" in err and "hermes" in err and "phi4" in err
