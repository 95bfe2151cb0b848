"""The escapes found against the code sandbox (issue 23), each checked from outside: no file
outside the sandbox created, changed or deleted, no connection reached a listener of ours, no
process left behind, the evaluator alive. Each runs twice: as shipped (the audit hook refuses
first, the outcome says "refused") and with the audit hook taken out of the guard, so the OS
boundary alone (bwrap, seccomp, the tmpfs cap) has to hold."""

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from loratune.eval import sandbox

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bubblewrap is not installed (apt-get install bubblewrap)")

EVALUATOR = """
import json, sys
from loratune.eval import sandbox
sandbox.GUARD = sandbox.Path(sys.argv[1])
out = sandbox.run_program(sys.stdin.read(), sandbox.Limits(timeout=20, cpu_seconds=10))
print(json.dumps([out.status, out.detail]))
"""
# walk from a caught refusal to the audit hook's frame (None without a hook)
HOOK_FRAME = """
def hook_frame():
    try:
        open({victim!r}, 'w')
    except OSError as e:
        tb = e.__traceback__
        while tb.tb_next:
            tb = tb.tb_next
        f = tb.tb_frame
        while f is not None and '_refuse' not in f.f_locals:
            f = f.f_back
        return f
"""
ATTEMPT = """
def attempt(step):
    try:
        step()
    except Exception as e:
        print('held:', repr(e))
"""
ESCAPES = {
    "traceback_code": HOOK_FRAME + ATTEMPT + """
import socket
f = hook_frame()
if f is not None:
    f.f_locals['_refuse'].__code__ = (lambda *a, **k: None).__code__
attempt(lambda: open({victim!r}, 'w').write('gone'))
attempt(lambda: socket.create_connection(('127.0.0.1', {port}), timeout=2))
attempt(lambda: __import__('subprocess').Popen(['setsid', 'sleep', {token!r}]))
attempt(lambda: __import__('subprocess').run(['id']))
""",
    "defaults": HOOK_FRAME + """
f = hook_frame()
if f is not None:
    inside = f.f_locals['_inside']
    inside.__defaults__ = tuple('' if isinstance(d, str) and d.startswith('/') else d
                                for d in inside.__defaults__)
open({victim!r}, 'w').write('gone')
""",
    "dir_fd_after_chdir": ATTEMPT + """
import os
rel = os.path.relpath({victim!r})
fd = os.open('.', os.O_RDONLY)
deep = '/'.join(['d'] * rel.split('/').count('..'))
os.makedirs(deep)
os.chdir(deep)  # from here `rel` looks inside the folder; from fd it is the victim
attempt(lambda: os.rename(rel, os.path.relpath({new!r}), src_dir_fd=fd, dst_dir_fd=fd))
attempt(lambda: os.unlink(rel, dir_fd=fd))
os.open(os.path.relpath({new!r}), os.O_WRONLY | os.O_CREAT, dir_fd=fd)
""",
    "cffi_system": """
import _cffi_backend as B
char_p = B.new_pointer_type(B.new_primitive_type('char'))
system = B.load_library(None).load_function(
    B.new_function_type((char_p,), B.new_primitive_type('int'), False), 'system')
system(B.newp(B.new_array_type(char_p, None), b'touch {new} ; sleep {token} &'))
""",
    "pidfd_kills_the_evaluator": """
import os, signal
signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)
""",
    "mkfifo": "import os\nos.mkfifo({new!r})\n",
    "mknod": "import os, stat\nos.mknod({new!r}, stat.S_IFIFO | 0o600)\n",
    "readline_history": "import readline\nreadline.write_history_file({new!r})\n",
    "socket": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
    "udp": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', "
           "('127.0.0.1', {port}))\n",
    "subprocess_id": "import subprocess\nsubprocess.run(['id'])\n",
    "fork_and_stay": "import os, time\nif os.fork() == 0:\n    os.setsid()\n"
                     "    os.execvp('sleep', ['sleep', {token!r}])\n",
}


@pytest.fixture(params=["hook", "no_hook"])
def guard(request, tmp_path):
    """The shipped guard, or a copy with the audit hook taken out."""
    if request.param == "hook":
        return sandbox.GUARD
    source = sandbox.GUARD.read_text()
    line = "    sys.addaudithook(make_hook(posix.getcwd()))\n"
    assert line in source  # the guard changed: update this fixture
    path = tmp_path / "unhooked_guard.py"
    path.write_text(source.replace(line, ""))
    return path


@contextlib.contextmanager
def listening():
    """A TCP and a UDP socket on one loopback port: an escape that reaches either is seen."""
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", tcp.getsockname()[1]))
        tcp.setblocking(False)
        udp.setblocking(False)
        yield tcp, udp


@pytest.fixture
def listener():
    with listening() as sockets:
        yield sockets


def reached(listener) -> bool:
    tcp, udp = listener
    for receive in (tcp.accept, lambda: udp.recv(16)):
        try:
            receive()
            return True
        except BlockingIOError:
            pass
    return False


def processes_with(token: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def evaluate(source: str, guard) -> tuple[int, list[str] | None]:
    """Run one program through run_program in a separate evaluator process: its exit status,
    and the outcome it printed (None if it died)."""
    proc = subprocess.run([sys.executable, "-c", EVALUATOR, str(guard)], input=source,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else None


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_ends_refused_and_harmless(name, guard, tmp_path, listener):
    victim, new = tmp_path / "victim.txt", tmp_path / "new"
    victim.write_text("keep")
    token = f"{random.randint(1000, 9999)}.{os.getpid()}"
    source = ESCAPES[name].format(victim=str(victim), new=str(new), token=token,
                                  port=listener[0].getsockname()[1])
    try:
        code, outcome = evaluate(source, guard)
    finally:
        left = processes_with(token)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert code == 0 and outcome is not None, f"the evaluator died (exit status {code})"
    assert {p.name for p in tmp_path.iterdir()} - {"unhooked_guard.py"} == {"victim.txt"}
    assert victim.read_text() == "keep"
    assert not reached(listener)
    assert left == []
    if guard == sandbox.GUARD or name not in ("dir_fd_after_chdir", "readline_history",
                                               "defaults"):
        assert outcome[0] == "refused", outcome
    assert outcome[0] != "passed", outcome


def test_the_folder_has_a_total_size_cap():
    """40 files of 16 MB each (each within the file-size limit): the tmpfs cap stops them."""
    src = ("for i in range(40):\n    with open(f'f{i}', 'wb') as f:\n"
           "        for _ in range(16):\n            f.write(bytes(2**20))\n")
    out = sandbox.run_program(src, sandbox.Limits(timeout=60, disk_mb=64))
    assert (out.status, out.detail) == ("error", "disk limit (the folder's total size)")
