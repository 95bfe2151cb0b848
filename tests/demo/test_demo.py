"""The main job, end to end (data checks live in test_demo_data.py)."""

import json

import pytest



@pytest.mark.slow
def test_demo_job_runs_end_to_end(tmp_path, capsys):
    """The main job's code path on the real model, shortened to two steps and four items."""
    from loratune.demo.job import run_demo

    report = run_demo(str(tmp_path / "demo"), ["train.max_steps=2", "eval.limit=4",
                                                "train.eval_every=null"])
    out = capsys.readouterr().out
    assert "held-out exact match" in out and "before" in out and "after" in out
    assert report["exact_match_before"] == 0.0 and report["steps"] == 2
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "demo" / "demo_report.json").read_text())["steps"] == 2


def test_plan_steps_fits_the_budget_within_the_target_and_the_tuned_length():
    from loratune.demo.job import DEMO_MIN_STEPS, plan_steps

    # left after 40 s spent, the 60 s eval, 3 steps of held-out loss and 10 s: 181 s = 60 steps
    plan = plan_steps(300, 40, 3.0, 60, max_steps=80)
    assert plan.steps == 60 and plan.estimate_seconds == 40 + 60 * 3.0 + 60 + 9 + 10
    assert plan.why == "60 steps fit the 300 s budget"
    fast = plan_steps(300, 40, 0.5, 20, max_steps=80)
    assert fast.steps == 80 and "the tuned length" in fast.why
    slow = plan_steps(300, 100, 10.0, 100, max_steps=80)  # 6 would fit: the target wins
    assert slow.steps == DEMO_MIN_STEPS and "(only 6 fit the 300 s budget" in slow.why
    assert slow.estimate_seconds == 100 + DEMO_MIN_STEPS * 10.0 + 100 + 30 + 10
    quick = plan_steps(0, 40, 0.5, 20, max_steps=80)
    assert quick.steps == DEMO_MIN_STEPS and quick.why.startswith("--quick")


MIN = 60  # DEMO_MIN_STEPS, written out: a change to it is seen here


@pytest.mark.parametrize("budget,steps,why", [
    (300.0, 80, "80 steps, the tuned length"),       # a tiny model: every step fits
    (1.0, MIN, f"{MIN} steps, the fewest that reach 90%"),  # nothing fits: never below target
    (0.0, MIN, f"--quick: {MIN} steps"),
])
def test_demo_sets_its_length_by_a_timed_probe(tmp_path, tiny_folder, data_file, capsys, budget,
                                              steps, why):
    """The whole job on a tiny model: the plan (and its estimate) is printed before training,
    the report has the before/after and the steps the plan chose."""
    from loratune.demo.job import run_demo

    report = run_demo(str(tmp_path / "demo"), [f"model.name={tiny_folder}", "eval.limit=4",
                                               f"data.train={data_file}", "data.eval=demo",
                                               "data.max_length=96", "train.batch_size=1",
                                               "eval.max_new_tokens=4"], budget_s=budget)
    out = capsys.readouterr().out
    assert report["steps"] == steps and report["plan"].startswith(why)
    first, plan = out.splitlines()[0], next(x for x in out.splitlines() if x.startswith("plan:"))
    assert first.startswith("loratune demo: load the model, held-out eval, LoRA training")
    assert out.index("before fine-tuning: exact match") < out.index("plan:") \
        < out.index("held-out exact match")
    assert "s/step (measured)" in plan and f"whole job ~{report['estimated_seconds']:.0f} s" \
        in plan
    assert f"(estimated {report['estimated_seconds']:.0f} s)" in out


def test_demo_with_max_steps_set_runs_no_probe(tmp_path, tiny_folder, data_file, capsys,
                                               monkeypatch):
    from loratune.demo import job

    monkeypatch.setattr(job, "probe_step_seconds", lambda *a: pytest.fail("probed"))
    report = job.run_demo(str(tmp_path / "d"), [f"model.name={tiny_folder}", "eval.limit=2",
                                                f"data.train={data_file}", "data.eval=demo",
                                                "eval.max_new_tokens=2", "train.max_steps=3"])
    assert report["steps"] == 3 and report["estimated_seconds"] is None
    assert "length from train.max_steps/epochs (no time probe)" in capsys.readouterr().out


def test_demo_flags(monkeypatch):
    from loratune import cli

    seen = {}
    monkeypatch.setattr("loratune.demo.job.run_demo", lambda **kw: seen.update(kw))
    assert cli.main(["demo", "--quick", "train.lr=1e-3"]) == 0
    assert seen["budget_s"] == 0.0 and seen["overrides"] == ["train.lr=1e-3"]
    assert cli.main(["demo", "train.lr=1e-3", "--budget", "120"]) == 0
    assert seen["budget_s"] == 120.0
    assert cli.main(["demo"]) == 0 and seen["budget_s"] == 300.0
