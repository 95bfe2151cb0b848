"""The code sandbox: each completion in its own process under bwrap; writes outside its
folder, sockets, processes and endless loops are refused or killed, and the outcome says which.
The escapes of issue 23 are in test_sandbox_escapes.py."""

import pytest

from loratune.eval import sandbox
from loratune.eval.sandbox import (Limits, SandboxError, UnsandboxedWarning, require_sandbox,
                                   run_program, run_programs)

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
@pytest.mark.parametrize("kind", ["bwrap", "none"])
def test_writing_outside_the_folder_is_refused(victim, source, kind):
    """Without bwrap the audit hook refuses; under bwrap the host's folder is not even there
    (the hook still refuses what it sees), and the program does not pass either way."""
    out = run_program(source.format(victim=str(victim), folder=str(victim.parent)), FAST, kind)
    assert out.status == "refused" if kind == "none" else out.status in ("refused", "failed")
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


def test_without_bwrap_the_sandbox_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    with pytest.raises(SandboxError, match=r"`bwrap` is not on PATH: install it \(apt-get "
                       r"install bubblewrap\), or pass --sandbox none"):
        require_sandbox("bwrap")
    with pytest.raises(SandboxError, match="apt-get install bubblewrap"):
        run_program("pass\n", FAST)
    with pytest.warns(UnsandboxedWarning, match="--sandbox none: generated code runs on this "
                      "machine with only an audit hook"):
        require_sandbox("none")
    assert run_program("assert 1\n", FAST, "none").status == "passed"
    with pytest.raises(SandboxError, match=r"sandbox \(--sandbox\): 'docker' is not bwrap"):
        require_sandbox("docker")


@pytest.mark.parametrize("source", [
    "import sys\nsys.exit(0)\nassert False\n",
    "import os\nos._exit(0)\n",
    "raise SystemExit\n",
    "raise SystemExit(0)\n",
])
@pytest.mark.parametrize("kind", ["bwrap", "none"])
def test_a_program_that_exits_before_the_end_fails(source, kind):
    out = run_program(source, FAST, kind)
    assert (out.status, out.detail) == ("failed", "exited before its tests finished")


def test_the_program_cannot_read_the_nonce_from_stdin():
    src = "import sys, os\nprint(os.read(0, 100))\nsys.exit(0)\n"
    assert run_program(src, FAST).status == "failed"


def test_the_host_is_not_visible_inside():
    """Not the user's home, the project folder, /etc or host processes; only the folder, the
    interpreter's folders and /usr."""
    import os
    import sys

    home = os.path.expanduser("~")
    src = (f"import os, sys\nassert os.listdir('/proc') and len([p for p in os.listdir('/proc') "
           f"if p.isdigit()]) <= 3, os.listdir('/proc')\n"
           f"assert not os.path.exists({home + '/.bashrc'!r})\n"
           f"assert not os.path.exists({os.getcwd() + '/pyproject.toml'!r})\n"
           f"assert not os.path.exists('/etc/passwd')\nassert os.getuid() == 65534\n"
           f"assert os.getcwd() == {sandbox.FOLDER!r}\n"
           f"assert os.path.exists({sys.prefix!r})\n")
    out = run_program(src, FAST)
    assert out.status == "passed", out


def test_threads_work_under_the_seccomp_filter():
    """The filter kills new processes, not threads (clone3 answers ENOSYS, glibc falls back to
    clone with CLONE_THREAD)."""
    src = ("import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) "
           "for i in range(4)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n"
           "assert sorted(out) == [0, 1, 2, 3]\n")
    assert run_program(src, FAST).status == "passed"


def test_without_libseccomp_it_warns_and_still_runs_under_bwrap(monkeypatch):
    from loratune.eval import seccomp

    assert seccomp.compiled_filter()  # here libseccomp is installed: a real BPF program
    monkeypatch.setattr(seccomp, "compiled_filter", lambda: None)
    with pytest.warns(UnsandboxedWarning, match="without a seccomp filter"):
        out = run_program("import os\nos.mkfifo('f')\nassert os.getuid() == 65534\n", FAST)
    assert out.status == "passed"  # no filter: a fifo in its own folder is allowed
