"""Run one untrusted program: `python -I -B sandbox_guard.py FOLDER PROGRAM LIMITS_JSON`.

Started by `loratune.eval.sandbox` in a fresh process (under bwrap: the OS boundary), this
file (standard library only) reads the run's nonce from stdin, sets the process's resource
limits, installs an audit hook, and only then runs PROGRAM in FOLDER; when the program has
returned it prints the nonce (a program that exits early never does). The hook is a second
layer that names what was refused (PermissionError, and a line on stderr the parent reads):
sockets, new processes, signals, ctypes and cffi, readline, writes outside FOLDER, opening
folders (a descriptor of one would let relative paths leave FOLDER), replacing a function's
code or defaults, and the introspection that would reach the hook's own state. See
`sandbox.py` for what stops a program that gets past it.
"""

import json
import posix
import resource
import sys

MARK = "loratune-sandbox: refused "
DONE = b"loratune-sandbox: finished "
WRITE_FLAGS = posix.O_WRONLY | posix.O_RDWR | posix.O_APPEND | posix.O_CREAT | posix.O_TRUNC
REFUSED = frozenset({
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "os.link", "os.chroot", "os.setuid", "os.setgid",
    "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.addressof",
    "ctypes.call_function", "ctypes.string_at", "ctypes.PyObj_FromPtr", "sqlite3.connect",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.setprofile",
    "sys.settrace", "webbrowser.open", "urllib.Request", "ftplib.connect", "smtplib.connect",
    "telnetlib.Telnet.open", "imaplib.open", "poplib.connect", "nntplib.connect",
    "resource.setrlimit", "resource.prlimit", "mmap.__new__",
})
# modules that start processes or reach memory without an audit event of their own
# (readline writes its history file from C, with no audit event)
REFUSED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "_cffi_backend",
                             "_xxsubinterpreters", "readline"})
# a function's code and defaults: the hook's own helpers must stay what they are
FROZEN_ATTRIBUTES = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
# events whose path arguments must all be inside the folder (first one / first two); immutable,
# as the hook's state can be reached from a traceback
ONE_PATH = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                      "os.utime", "os.truncate", "os.chflags", "os.lchflags", "os.setxattr",
                      "os.removexattr", "shutil.rmtree"})
TWO_PATHS = frozenset({"os.rename", "os.symlink", "shutil.move", "shutil.copyfile",
                       "shutil.copytree"})


def set_limits(limits: dict) -> None:
    cpu, memory, size = limits["cpu_seconds"], limits["memory_bytes"], limits["file_bytes"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def make_hook(folder: str):
    """The audit hook. It keeps what it uses as C functions bound at creation (default
    arguments): code that later replaces os.lstat or os.path.realpath cannot fool the check."""

    def resolve(path, _lstat=posix.lstat, _readlink=posix.readlink, _getcwd=posix.getcwd,
                _fspath=posix.fspath, _isinstance=isinstance, _bytes=bytes):
        """The path with every symlink followed (posixpath.realpath's job, done with C calls)."""
        path = _fspath(path)
        if _isinstance(path, _bytes):
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            path = _getcwd() + "/" + path
        parts, done, hops = path.split("/"), [], 0
        while parts:
            part = parts.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                done = done[:-1]
                continue
            candidate = "/" + "/".join(done + [part])
            try:
                mode = _lstat(candidate).st_mode
            except OSError:
                done.append(part)
                continue
            if mode & 0o170000 == 0o120000:  # a symlink: go on from its target
                hops += 1
                if hops > 40:
                    raise PermissionError(f"{MARK}too many symlinks: {path}")
                target = _readlink(candidate)
                parts = target.split("/") + parts
                if target.startswith("/"):
                    done = []
            else:
                done.append(part)
        return "/" + "/".join(done)

    def inside(path, _int=int, _root=folder, _isinstance=isinstance, _resolve=resolve) -> bool:
        if _isinstance(path, _int):
            return True  # a descriptor: it was opened (and checked) by an earlier call
        real = _resolve(path)
        return real == _root or real.startswith(_root + "/")

    def is_dir(path, _lstat=posix.stat) -> bool:
        try:
            return _lstat(path).st_mode & 0o170000 == 0o040000
        except (OSError, TypeError, ValueError):
            return False

    def refuse(what, _write=posix.write, _mark=MARK.encode()):
        _write(2, _mark + what.encode("utf-8", "replace") + b"\n")
        raise PermissionError(f"{MARK}{what}")

    def hook(event, args, _refused=REFUSED, _imports=REFUSED_IMPORTS, _one=ONE_PATH,
             _two=TWO_PATHS, _frozen=FROZEN_ATTRIBUTES, _writes=WRITE_FLAGS, _inside=inside,
             _is_dir=is_dir, _refuse=refuse, _isinstance=isinstance, _int=int):
        if event == "open":
            path, _, flags = args
            if path is None or _isinstance(path, _int):
                return
            if (flags or 0) & _writes and not _inside(path):
                _refuse(f"writing outside the folder: {path}")
            if not (flags or 0) & _writes and _is_dir(path):  # (O_TMPFILE has write flags)
                _refuse(f"opening a folder: {path}")
        elif event.startswith("socket."):
            _refuse(f"network ({event})")
        elif event in _refused:
            _refuse(event)
        elif event == "import" and args[0] in _imports:
            _refuse(f"importing {args[0]}")
        elif event == "object.__setattr__" and args[1] in _frozen:
            _refuse(f"replacing {args[1]}")
        elif event in _one or event in _two:
            for path in args[:2 if event in _two else 1]:
                if path is not None and not _inside(path):
                    _refuse(f"{event} outside the folder: {path}")

    return hook


def take_nonce() -> bytes:
    """The run's nonce from stdin; stdin is then /dev/null (the program cannot read it)."""
    nonce = posix.read(0, 64).strip()
    null = posix.open("/dev/null", posix.O_RDONLY)
    posix.dup2(null, 0)
    posix.close(null)
    return nonce


def main() -> None:
    folder, program, limits = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    nonce = take_nonce()
    posix.chdir(folder)
    with open(program, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, program, "exec")
    set_limits(limits)
    sys.argv = [program]
    sys.path.insert(0, folder)
    sys.addaudithook(make_hook(posix.getcwd()))
    exec(code, {"__name__": "__main__", "__file__": program, "__builtins__": __builtins__})
    sys.stdout.flush()  # the nonce comes last: nothing buffered may follow it
    posix.write(1, b"\n" + DONE + nonce + b"\n")


if __name__ == "__main__":
    main()
