"""The dashboard in a real headless Chromium (Debian's chromium + chromedriver, driven by
Selenium; nothing is downloaded). Marked `browser`; skipped with the reason when either is
missing. LORATUNE_SCREENSHOTS=DIR saves a PNG of each page there (docs/ui.md's pictures)."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from loratune.train.status import read_status
from loratune.ui.app import build_app
from ui_server import Server

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SHOTS = os.environ.get("LORATUNE_SCREENSHOTS")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                    "(pip install -e '.[test]')")
    if not (CHROMIUM and DRIVER):
        pytest.skip("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture
def site(runs_dir, tmp_path_factory):
    # launched runs read the test's model folder and data file, both under pytest's basetemp
    app = build_app(runs_dir, data_roots=[tmp_path_factory.getbasetemp()])
    server = Server(app)
    yield server
    server.stop()
    app.state.ui.launcher.close()   # a test that failed half-way leaves no training behind


def wait(predicate, timeout=30.0, every=0.1, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(browser, site, hash_):
    browser.get(f"{site.url}/#{hash_}")
    browser.refresh()   # a hash change alone would not reload
    wait(lambda: browser.execute_script("return document.body.dataset.ready") is not None,
         what=f"page {hash_}")


def shot(browser, name, at=None):
    """With LORATUNE_SCREENSHOTS=DIR: the page (or the window around selector `at`) as
    DIR/name.png, in 64 colours (small files)."""
    if SHOTS:
        from PIL import Image

        path = Path(SHOTS) / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = browser.get_window_size()
        if at:
            browser.execute_script("document.querySelector(arguments[0])"
                                   ".scrollIntoView({block: 'center'})", at)
        else:
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.set_window_size(1280, min(max(height + 140, 700), 1800))   # the whole page
            browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(path))
        browser.set_window_size(size["width"], size["height"])
        Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)


def css(browser, selector):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def states_in_table(browser):
    """{run: status} in table order (read in one script: the table redraws every 3 s)."""
    pairs = browser.execute_script(
        "return [...document.querySelectorAll('#runs-table tr[data-run]')].map(r => "
        "[r.dataset.run, r.querySelector('[data-state]').textContent])")
    return dict(pairs)


def test_runs_table_lists_a_finished_and_a_running_run(browser, site, writer):
    open_page(browser, site, "/runs")
    states = wait(lambda: states_in_table(browser), what="rows")
    assert states["done"] == "finished" and states["live"] == "running"
    assert states["stopped"] == "interrupted"
    css(browser, "th[data-key='last_loss']")[0].click()   # sort by last loss, ascending
    assert list(states_in_table(browser)) == ["live", "stopped", "done"]
    css(browser, "th[data-key='last_loss']")[0].click()   # again: descending
    assert list(states_in_table(browser)) == ["done", "stopped", "live"]
    filt = css(browser, "#runs-filter")[0]
    filt.send_keys("dora")
    assert list(states_in_table(browser)) == ["live"]
    filt.clear()
    filt.send_keys(" ")   # input event with an empty filter
    wait(lambda: len(states_in_table(browser)) == 3, what="unfiltered")
    shot(browser, "runs")


def _points(browser, chart="#chart-loss"):
    """Points of the chart's training-loss line (read in one script: the chart redraws)."""
    return browser.execute_script(
        "const l = document.querySelector(arguments[0]); return l ? +l.dataset.points : 0",
        f"{chart} polyline[data-series='train']")


def test_live_curve_gains_points_while_the_run_writes(browser, site, writer):
    open_page(browser, site, "/run/live")
    first = wait(lambda: _points(browser), what="first points")
    later = wait(lambda: _points(browser) >= first + 3 and _points(browser), what="new points")
    assert later > first
    assert css(browser, "#run-state [data-state]")[0].text == "running"
    assert css(browser, "#stop")[0].is_displayed()


def test_launch_form_rejects_a_bad_value_then_trains_stops_and_resumes(
        browser, site, runs_dir, tiny_folder, data_file):
    open_page(browser, site, "/launch")
    field = css(browser, "input[name='train.lr']")[0]
    field.clear()
    field.send_keys("-1")
    css(browser, "input[name='name']")[0].clear()
    css(browser, "input[name='name']")[0].send_keys("from-form")
    css(browser, "#launch-start")[0].click()
    msg = wait(lambda: css(browser, "[data-error-for='train.lr']")[0].text, what="field error")
    assert msg == "Input should be greater than 0"
    assert "invalid" in css(browser, "[data-field='train.lr']")[0].get_attribute("class")
    assert not (runs_dir / "from-form").exists()
    shot(browser, "launch", at="[data-field='train.lr']")

    def set_field(name, value):
        box = css(browser, f"input[name='{name}']")[0]
        box.clear()
        box.send_keys(value)

    set_field("train.lr", "0.005")
    set_field("model.name", str(tiny_folder))
    set_field("data.train", str(data_file))
    set_field("data.max_length", "64")
    # Many steps, stopped twice: the test takes the same few seconds of training on a slow or
    # a fast machine, and never waits for the end.
    set_field("train.max_steps", "5000")
    set_field("train.batch_size", "2")
    set_field("adapter.r", "4")
    css(browser, "input[name='train.report_to'][value='tensorboard']")[0].click()
    css(browser, "#launch-start")[0].click()
    wait(lambda: "#/run/from-form" in browser.current_url, what="the run page")
    wait(lambda: css(browser, "#run-name"), what="run page drawn")
    first = wait(lambda: _points(browser), timeout=120, what="first points of the real run")
    wait(lambda: _points(browser) > first, timeout=60, what="more points")
    shot(browser, "run")
    out = runs_dir / "from-form"

    def stop_and_checkpoint():
        css(browser, "#stop")[0].click()
        wait(lambda: css(browser, "#run-state [data-state='interrupted']"), timeout=60,
             what="interrupted")
        step = read_status(out)["step"]
        assert (out / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").is_file()
        return step

    stopped_at = stop_and_checkpoint()
    assert 0 < stopped_at < 5000
    css(browser, "#resume")[0].click()
    wait(lambda: css(browser, "#run-state [data-state='running']"), timeout=30, what="running")
    wait(lambda: _points(browser) > stopped_at + 2, timeout=120, what="points after resume")
    stopped_again = stop_and_checkpoint()
    assert stopped_again > stopped_at

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = sorted({e.step for e in acc.Scalars("train/loss")})
    assert steps == list(range(1, stopped_again + 1))   # both starts, every step
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text()
              .splitlines()]
    assert logged == list(range(1, stopped_again + 1))


def test_finished_run_page_shows_curves_samples_and_adapter(browser, site, runs_dir):
    open_page(browser, site, "/run/done")
    wait(lambda: _points(browser) == 6, what="all six points")
    assert css(browser, "#run-state [data-state]")[0].text == "finished"
    assert not css(browser, "#stop")[0].is_displayed()
    assert not css(browser, "#resume")[0].is_displayed()
    cells = [td.text for td in css(browser, "#samples td")]
    assert cells == ["Repeat the word apple", "apple apple apple", "Apple.", "apple apple apple"]
    assert "merges into the base: yes" in browser.page_source
    assert "25.0% → 75.0%" in browser.page_source
    assert "max_steps: 6" in css(browser, "#config")[0].text
    shot(browser, "run-finished")


def test_compare_overlays_the_chosen_runs_and_shows_reports(browser, site):
    open_page(browser, site, "/compare?runs=done,stopped")
    wait(lambda: len(css(browser, "#compare-loss polyline")) == 2, what="two curves")
    names = set(browser.execute_script(
        "return [...document.querySelectorAll('#compare-loss polyline')].map(p => p.dataset.series)"))
    assert names == {"done", "stopped"}
    rows = css(browser, "table.report tr")
    assert len(rows) == 3 and "lora" in rows[1].text
    wait(lambda: browser.execute_script(
        "const i = document.querySelector('#reports img'); return i && i.naturalWidth > 0"),
        what="the compare plot")
    shot(browser, "compare")


def test_plan_form_draws_the_breakdown(browser, site):
    open_page(browser, site, "/plan")
    wait(lambda: css(browser, "#plan-chart rect[data-label='total']"), what="bars")
    labels = [r.get_attribute("data-label") for r in css(browser, "#plan-chart rect")]
    assert "weights" in labels and "activations" in labels
    assert "llama-2-7b" in css(browser, "#plan-report")[0].text
    shot(browser, "plan")


@pytest.fixture
def chat_site(runs_dir, smol_tokenizer, tmp_path):
    """The dashboard pointed at a real `serve` app (engine on a tiny model) on another port."""
    from loratune.serve.api import build_app as serve_app
    from loratune.serve.engine import Engine
    from loratune.serve.pool import AdapterPool
    from tiny import tiny_llama

    (tmp_path / "adapters").mkdir()
    shutil.copytree(runs_dir / "done" / "adapter", tmp_path / "adapters" / "done")
    engine = Engine(tiny_llama(vocab=len(smol_tokenizer)), smol_tokenizer,
                    AdapterPool(str(tmp_path / "adapters")), base_name="tiny",
                    max_completion_tokens=32).start()
    serve = Server(serve_app(engine))
    ui = Server(build_app(runs_dir, serve_url=serve.url))
    yield ui, engine
    ui.stop()
    serve.stop()
    engine.stop()


def test_chat_playground_answers_side_by_side(browser, chat_site):
    site, engine = chat_site
    open_page(browser, site, "/chat")
    wait(lambda: len(css(browser, "#chat-models input")) == 2, what="models")
    css(browser, "#chat-prompt")[0].send_keys("Repeat the word apple")
    box = css(browser, "#chat-max")[0]
    box.clear()
    box.send_keys("8")
    css(browser, "#chat-send")[0].click()
    wait(lambda: len(css(browser, "#chat-answers .answer")) == 2, timeout=60, what="answers")
    answers = {a.get_attribute("data-model"): a.text for a in css(browser, "#chat-answers .answer")}
    assert set(answers) == {"tiny", "done"}
    assert all(text.strip() != name for name, text in answers.items())   # a reply under the name
    shot(browser, "chat")


def test_study_page_table_score_and_pareto_charts(browser, site, runs_dir):
    """A search study: listed, its trials table (the running trial read from study.db), the
    score over trials and the Pareto chart; a param name holding HTML is shown as text."""
    from study_folder import make_study

    folder = make_study(runs_dir / "study")
    hostile = "<img src=x onerror=\"document.title='pwned'\">"
    report = json.loads((folder / "report.json").read_text())
    report["trials"][0]["params"][hostile] = "<b>x</b>"
    (folder / "report.json").write_text(json.dumps(report))
    try:
        open_page(browser, site, "/studies")
        assert css(browser, "#studies-table tr[data-study='study'] a")[0].text == "study"
        open_page(browser, site, "/study/study")
        rows = browser.execute_script(
            "return [...document.querySelectorAll('#study-trials tr[data-trial]')].map(r => "
            "[...r.cells].map(c => c.textContent))")
        heads = [th.text for th in css(browser, "#study-trials th")]
        assert heads[:6] == ["trial", "state", "method", "r", "lr", hostile]
        assert [r[1] for r in rows] == ["complete", "complete Pareto", "complete Pareto",
                                        "pruned", "running"]
        assert rows[0][5] == "<b>x</b>" and rows[3][-1].startswith("planned 5.20 GiB")
        assert not css(browser, "#page img, #page b") and browser.title != "pwned"
        assert "1 trial(s) newer than report.json" in css(browser, "#study-stale")[0].text
        dots = css(browser, ".study-pareto circle[data-series='trials']")
        front = css(browser, ".study-pareto polyline[data-series='Pareto front']")
        assert len(dots) == 3 and front[0].get_attribute("data-points") == "2"
        score = css(browser, "#study-score polyline[data-series='best so far']")
        assert score[0].get_attribute("data-points") == "3"
        shot(browser, "study")
    finally:
        import shutil

        shutil.rmtree(folder)
