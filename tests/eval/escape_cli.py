"""The code sandbox's escapes (issue 23) re-run through the command line, checked from outside.

    .venv/bin/python tests/eval/escape_cli.py [--keep DIR]

Writes a tiny random model folder and a HumanEval-format file whose problems are the escapes
of test_sandbox_escapes.py (plus exits inside the function under test), then runs
`loratune eval --task code` on them as a user would. The model writes one token per problem,
which lands inside a string literal the problem opens and its test closes, so each program is
the attack whatever the token. Then, from outside: the command exited 0 (the evaluator was not
killed), no row passed, no row was a syntax error (the attack ran), the victim file is intact,
nothing new appeared beside it, no connection reached our listener, and no process carrying
the run's token is left. Prints one line per problem; exit status 0 when all ended harmless.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from test_sandbox_escapes import ESCAPES, listening, processes_with, reached  # noqa: E402

EXITS = {  # a program that exits inside the function before check() finished
    "sys_exit_in_function": "    import sys\n    sys.exit(0)\n",
    "os_exit_in_function": "    import os\n    os._exit(0)\n",
    "system_exit_in_function": "    raise SystemExit(0)\n",
}
OPEN, CLOSE = "_completion = r'''", "\n'''\n"  # the model's token goes in between


def problems(victim: Path, new: Path, token: str, port: int) -> list[dict]:
    fill = {"victim": str(victim), "new": str(new), "token": token, "port": port}
    rows = [{"task_id": name, "prompt": ESCAPES[name].format(**fill) +
             f"\ndef f():\n    return 1\n{OPEN}", "entry_point": "f",
             "test": f"{CLOSE}def check(c):\n    assert c() == 1\n"} for name in sorted(ESCAPES)]
    rows += [{"task_id": name, "prompt": f"def f():\n{body}    return 1\n{OPEN}",
              "entry_point": "f", "test": f"{CLOSE}def check(c):\n    assert c() == 1\n"}
             for name, body in EXITS.items()]
    return rows


def model_folder(folder: Path) -> Path:
    from loratune.models import load_tokenizer
    from tiny import tiny_llama

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tiny_llama(vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_cli(model: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    loratune = Path(sys.executable).parent / "loratune"
    return subprocess.run([str(loratune), "eval", "--model", str(model), "--task", "code",
                           "--data", str(data), "--max-new-tokens", "1", "--timeout", "20",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)


def judge(rows: list[dict], outside: Path, listener, token: str) -> list[str]:
    """What was not harmless; [] when all held."""
    bad = [f"{r['task_id']}: {r['status']} {r['detail']}" for r in rows
           if r["status"] == "passed" or "SyntaxError" in r["detail"]]
    extra = {p.name for p in outside.iterdir()} - {"victim.txt"}
    if (outside / "victim.txt").read_text() != "keep":
        bad.append("the victim file outside was changed or deleted")
    if extra:
        bad.append(f"new files outside: {sorted(extra)}")
    if reached(listener):
        bad.append("a connection reached the listener outside")
    left = processes_with(token)
    if left:
        bad.append(f"processes left: {left}")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="work in this folder and keep it")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="loratune-escapes-"))
    outside = work / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "victim.txt").write_text("keep")
    token = f"{random.randint(1000, 9999)}.{os.getpid()}"
    with listening() as (tcp, udp):
        data = work / "escapes.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in problems(
            outside / "victim.txt", outside / "new", token, tcp.getsockname()[1])))
        proc = run_cli(model_folder(work / "model"), data, work / "out")
        if proc.returncode != 0:
            print(f"loratune eval exited {proc.returncode}:\n{proc.stderr[-3000:]}")
            return 1
        rows = json.loads((work / "out" / "eval-code.json").read_text())["variants"][0]["rows"]
        for r in rows:
            print(f"{r['task_id']:28} {r['status']:8} {r['detail']}")
        bad = judge(rows, outside, (tcp, udp), token)
    print("\n".join(["NOT HARMLESS:", *bad]) if bad else f"all {len(rows)} ended harmless")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
