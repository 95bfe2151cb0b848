"""The code sandbox: each completion in its own process; writes outside its folder, sockets,
processes and endless loops are refused or killed, and the outcome says which."""

import pytest

from loratune.eval.sandbox import Limits, run_program, run_programs

FAST = Limits(timeout=4, cpu_seconds=2, memory_mb=512)


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("keep")
    return path


def test_a_correct_program_passes_and_a_wrong_one_fails():
    assert run_program("assert sum([1, 2]) == 3\n", FAST).status == "passed"
    out = run_program("def f():\n    return 2\nassert f() == 3, 'f is wrong'\n", FAST)
    assert (out.status, out.detail) == ("failed", "AssertionError: f is wrong")


@pytest.mark.parametrize("source", [
    "open({victim!r}, 'w').write('gone')",
    "import os\nos.remove({victim!r})",
    "import os\nos.rename({victim!r}, 'mine')",
    "import shutil\nshutil.rmtree({folder!r})",
    "import os\nos.chdir({folder!r})\nopen('victim.txt', 'a').write('x')",
    "import os\nos.symlink({folder!r}, 'link')\nopen('link/victim.txt', 'w')",
    "import os\nfd = os.open({folder!r}, os.O_RDONLY)\n"
    "os.open('victim.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=fd)",
    # replacing the functions a path check might use does not fool it
    "import os, posixpath\nos.lstat = os.stat = None\nposixpath.realpath = lambda p: p\n"
    "open({victim!r}, 'w')",
    # catching the refusal does not turn it into a pass
    "try:\n    open({victim!r}, 'w')\nexcept OSError:\n    pass\n",
])
def test_writing_outside_the_folder_is_refused(victim, source):
    out = run_program(source.format(victim=str(victim), folder=str(victim.parent)), FAST)
    assert out.status == "refused", out
    assert victim.read_text() == "keep"


def test_writing_inside_its_own_folder_is_allowed():
    src = ("import os, tempfile\nopen('a.txt', 'w').write('x')\nos.mkdir('d')\n"
           "os.rename('a.txt', 'd/b.txt')\nassert open('d/b.txt').read() == 'x'\n"
           "with tempfile.NamedTemporaryFile('w') as f: f.write('y')\n")
    assert run_program(src, FAST).status == "passed"


@pytest.mark.parametrize("source, detail", [
    ("import socket\nsocket.socket().connect(('127.0.0.1', 9))", "network (socket.__new__)"),
    ("import socket\nsocket.getaddrinfo('example.com', 80)", "network (socket.getaddrinfo)"),
    ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')", "urllib.Request"),
    ("import subprocess\nsubprocess.run(['true'])", "importing _posixsubprocess"),
    ("import os\nos.system('true')", "os.system"),
    ("import os\nos.fork()", "os.fork"),
    ("import os\nos.kill(1, 0)", "os.kill"),
    ("import ctypes", "importing _ctypes"),
    ("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
     "resource.setrlimit"),
])
def test_network_processes_signals_and_ctypes_are_refused(source, detail):
    out = run_program(source, FAST)
    assert (out.status, out.detail) == ("refused", detail)


def test_endless_loops_and_sleeps_are_killed():
    spin = run_program("while True:\n    pass\n", Limits(timeout=30, cpu_seconds=1))
    assert (spin.status, spin.detail) == ("timeout", "CPU-time limit") and spin.seconds < 25
    sleep = run_program("import time\ntime.sleep(60)\n", Limits(timeout=1, cpu_seconds=5))
    assert (sleep.status, sleep.detail) == ("timeout", "wall-clock limit")
    assert sleep.seconds < 10


def test_memory_is_capped():
    out = run_program("x = bytearray(2 * 2**30)\n", Limits(memory_mb=256))
    assert out.status == "memory"


def test_programs_run_in_separate_processes_and_folders():
    src = "import os\nopen('mark', 'x').write(str(os.getpid()))\nprint(os.getcwd())\n"
    outs = run_programs([src] * 3, FAST, workers=3)
    assert [o.status for o in outs] == ["passed"] * 3  # 'x' mode: the file was not there yet
