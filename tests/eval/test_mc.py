"""`mc`: option log-likelihood on files whose right answers are forced by construction."""

import csv
import json
import math

import pytest

from loratune.config.commands import EvalCommandConfig
from loratune.data import DataError
from loratune.eval.mc_files import read_questions
from loratune.eval.run import run_eval
from loratune.eval.tasks import TaskError
from loratune.eval.tasks.mc import prefix_text, question_text
from tiny import unigram_llama

APPLE = 11977  # " apple"


def write_mmlu(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.fixture
def forced(tmp_path):
    """A unigram model gives " apple" logit 2 and every other token 0, so an option's
    log-likelihood is (#apple tokens) * 2 - (#tokens) * log(e^2 + V - 1). By construction:
    fruit_test.csv  1: answer A " apple" vs single other words -> acc yes, acc_norm yes
                    2: answer B " apple apple" (2 tokens, 12 bytes) vs A " no" (1 token, 3 bytes):
                       the sum prefers " no", the per-byte score " apple apple" -> no, yes
    misc_test.csv   3: answer C " stone", while A is " apple"                -> no, no
                    4: answer D " apple"                                      -> yes, yes
    acc 2/4, acc_norm 3/4; fruit 1/2 and 2/2, misc 1/2 and 1/2."""
    folder = tmp_path / "test"
    folder.mkdir()
    write_mmlu(folder / "fruit_test.csv", [
        ["Which is a fruit?", "apple", "river", "stone", "cloud", "A"],
        ["Say it twice.", "no", "apple apple", "river", "cloud", "B"],
    ])
    write_mmlu(folder / "misc_test.csv", [
        ["Which is heavy?", "apple", "river", "stone", "cloud", "C"],
        ["Which is red?", "river", "stone", "cloud", "apple", "D"],
    ])
    return folder


def test_forced_answers_give_the_hand_computed_scores(forced, smol_tokenizer):
    tok = smol_tokenizer
    for text, ids in [(" apple", [APPLE]), (" apple apple", [APPLE, APPLE]), (" no", [787])]:
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
    model = unigram_llama({APPLE: 2.0}, len(tok))
    run = run_eval(EvalCommandConfig(task="mc", data=str(forced)), model, tok)
    result = run.variants[0].result
    assert result.metrics == {"acc": 0.5, "acc_norm": 0.75, "acc_macro": 0.5}
    assert result.groups == {"fruit": {"acc": 0.5, "acc_norm": 1.0, "n": 2},
                             "misc": {"acc": 0.5, "acc_norm": 0.5, "n": 2}}
    other = -math.log(math.exp(2) + len(tok) - 1)
    second = result.rows[1]
    assert (second["pred"], second["pred_norm"], second["answer"]) == ("A", "B", "B")
    assert second["logprobs"][:2] == pytest.approx([other, 2 * (2 + other)], abs=1e-3)
    assert run.data.extra == {"subjects": 2, "shots": 0}


def test_letter_scoring_reads_the_letter_after_answer(forced, smol_tokenizer):
    """Letters only: the unigram model boosts " B" (id 389), so it answers B everywhere: 1/4."""
    model = unigram_llama({389: 5.0}, len(smol_tokenizer))
    cfg = EvalCommandConfig(task="mc", data=str(forced), mc_score="letter")
    result = run_eval(cfg, model, smol_tokenizer).variants[0].result
    assert [r["pred"] for r in result.rows] == ["B"] * 4
    assert result.metrics["acc"] == 0.25


def test_k_shot_prompt_is_the_mmlu_layout(tmp_path, forced, smol_tokenizer):
    dev = tmp_path / "dev"
    dev.mkdir()
    write_mmlu(dev / "fruit_dev.csv", [["Pick one.", "x", "y", "A"], ["Pick two.", "u", "v", "B"]])
    write_mmlu(dev / "misc_dev.csv", [["Pick three.", "k", "l", "B"], ["P4", "m", "n", "A"]])
    shots = read_questions(dev / "fruit_dev.csv")
    assert prefix_text("fruit", shots[:1], False, "text") == (
        "The following are multiple choice questions (with answers) about fruit.\n\n"
        "Pick one.\nA. x\nB. y\nAnswer: x\n\n")
    q = read_questions(forced / "fruit_test.csv")[0]
    assert question_text(q) == "Which is a fruit?\nA. apple\nB. river\nC. stone\nD. cloud\nAnswer:"
    model = unigram_llama({APPLE: 2.0}, len(smol_tokenizer))
    cfg = EvalCommandConfig(task="mc", data=str(forced), shots=2, dev=str(dev))
    run = run_eval(cfg, model, smol_tokenizer)
    assert run.variants[0].result.metrics["acc_norm"] == 0.75  # unigram: context-free
    assert set(run.data.files) == {str(p) for p in [*forced.iterdir(), *dev.iterdir()]}
    with pytest.raises(TaskError, match="--shots 3 needs --dev FILE"):
        run_eval(EvalCommandConfig(task="mc", data=str(forced), shots=3), model, smol_tokenizer)
    with pytest.raises(TaskError, match=r"2 solved examples of subject 'fruit'; --shots needs 3"):
        run_eval(cfg.model_copy(update={"shots": 3}), model, smol_tokenizer)


def test_shots_with_a_real_context_use_the_cache_and_match_the_plain_path(
        forced, smol_tokenizer, monkeypatch):
    from loratune.eval.loglik import score_items
    from loratune.eval.tasks import mc
    from tiny import tiny_llama

    model = tiny_llama(vocab=len(smol_tokenizer))
    cfg = EvalCommandConfig(task="mc", data=str(forced), shots=1, dev=str(forced))
    data = mc.read(cfg)
    cached = mc.score(model, smol_tokenizer, data, cfg).rows
    monkeypatch.setattr(mc, "score_items",
                        lambda *a, **kw: score_items(*a, **{**kw, "reuse_cache": False}))
    plain = mc.score(model, smol_tokenizer, data, cfg).rows
    flat = [x for r in plain for x in r["logprobs"]]
    assert [x for r in cached for x in r["logprobs"]] == pytest.approx(flat, abs=2e-3)


def test_layouts_ceval_cmmlu_and_jsonl(tmp_path):
    ceval = tmp_path / "computer_network_val.csv"
    ceval.write_text("id,question,A,B,C,D,answer,explanation\n0,协议?,TCP,UDP,IP,ARP,B,因为\n",
                     encoding="utf-8")
    cmmlu = tmp_path / "agronomy.csv"
    cmmlu.write_text(",Question,A,B,C,D,Answer\n0,Q?,a,b,c,d,D\n", encoding="utf-8")
    hf = tmp_path / "mmlu.jsonl"
    hf.write_text(json.dumps({"question": "Q", "subject": "anatomy", "choices": ["p", "q", "r"],
                              "answer": 2}) + "\n")
    (q1,), (q2,), (q3,) = read_questions(ceval), read_questions(cmmlu), read_questions(hf)
    assert (q1.subject, q1.options, q1.answer) == ("computer_network",
                                                  ["TCP", "UDP", "IP", "ARP"], 1)
    assert (q2.subject, q2.question, q2.answer) == ("agronomy", "Q?", 3)
    assert (q3.subject, q3.options, q3.answer) == ("anatomy", ["p", "q", "r"], 2)
    assert question_text(q1).endswith("D. ARP\n答案：")
    assert prefix_text("computer_network", [], True, "text").startswith("以下是关于computer network")


def test_bad_rows_are_named_by_file_and_line(tmp_path):
    bad = write_mmlu(tmp_path / "x_test.csv", [["Q", "a", "b", "c", "d", "A"],
                                               ["Q", "a", "b", "c", "d", "E"]])
    with pytest.raises(DataError, match=rf"{bad}:2: answer 'E': expected a letter A-D"):
        read_questions(bad)
    short = write_mmlu(tmp_path / "y_test.csv", [["Q", "a", "A"]])
    with pytest.raises(DataError, match=rf"{short}:1: expected question, two or more options"):
        read_questions(short)
    rec = tmp_path / "r.jsonl"
    rec.write_text(json.dumps({"prompt": "Q", "answer": "A"}) + "\n")
    with pytest.raises(DataError, match=rf"{rec}:1: expected fields question and answer"):
        read_questions(rec)


@pytest.mark.slow
def test_real_model_cached_scores_equal_the_plain_path_and_beat_chance(monkeypatch):
    """SmolLM2-135M on the bundled world-facts sample (8 questions, 1 shot): the cache-reusing
    path gives the plain path's log-likelihoods (sdpa, fp32), and more than chance (25%)."""
    import loratune.eval
    from loratune.eval.loglik import score_items
    from loratune.eval.tasks import mc
    from loratune.models import load_model

    samples = __import__("pathlib").Path(loratune.eval.__file__).parent / "samples" / "mc"
    cfg = EvalCommandConfig(task="mc", data=str(samples / "test" / "world_facts_test.csv"),
                            shots=1, dev=str(samples / "dev"))
    model, tok = load_model("smollm2-135m-instruct")
    data = mc.read(cfg)
    cached = mc.score(model, tok, data, cfg)
    monkeypatch.setattr(mc, "score_items",
                        lambda *a, **kw: score_items(*a, **{**kw, "reuse_cache": False}))
    plain = mc.score(model, tok, data, cfg)
    flat = [x for r in plain.rows for x in r["logprobs"]]
    assert [x for r in cached.rows for x in r["logprobs"]] == pytest.approx(flat, abs=1e-3)
    assert cached.metrics["acc"] > 0.25
