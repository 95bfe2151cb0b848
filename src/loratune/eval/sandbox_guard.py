"""Run one untrusted program: `python -I -B sandbox_guard.py FOLDER PROGRAM LIMITS_JSON`.

Started by `loratune.eval.sandbox` in a fresh process, this file (standard library only) sets
the process's resource limits, installs an audit hook, and only then runs the program, in
FOLDER. The hook refuses (PermissionError, and a line on stderr the parent reads) sockets,
new processes, signals to other processes, ctypes, writes and directory opens outside FOLDER,
and the introspection that would reach the hook's own state. See `sandbox.py` for what this
does not stop.
"""

import json
import posix
import resource
import sys

MARK = "loratune-sandbox: refused "
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
REFUSED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "_xxsubinterpreters"})
# events whose path arguments must all be inside the folder (first one / first two)
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
               "os.utime": 1, "os.truncate": 1, "os.chflags": 1, "os.lchflags": 1,
               "os.setxattr": 1, "os.removexattr": 1, "os.rename": 2, "os.symlink": 2,
               "shutil.rmtree": 1, "shutil.move": 2, "shutil.copyfile": 2, "shutil.copytree": 2}


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
                _fspath=posix.fspath):
        """The path with every symlink followed (posixpath.realpath's job, done with C calls)."""
        path = _fspath(path)
        if isinstance(path, bytes):
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

    def inside(path, _str=str, _int=int, _root=folder) -> bool:
        if isinstance(path, _int):
            return True  # a descriptor: it was opened (and checked) by an earlier call
        real = resolve(path)
        return real == _root or real.startswith(_root + "/")

    def is_dir(path, _lstat=posix.stat) -> bool:
        try:
            return _lstat(path).st_mode & 0o170000 == 0o040000
        except (OSError, TypeError, ValueError):
            return False

    def refuse(what, _write=posix.write, _mark=MARK.encode()):
        _write(2, _mark + what.encode("utf-8", "replace") + b"\n")
        raise PermissionError(f"{MARK}{what}")

    def hook(event, args, _refused=REFUSED, _imports=REFUSED_IMPORTS, _paths=PATH_EVENTS,
             _writes=WRITE_FLAGS, _inside=inside, _is_dir=is_dir, _refuse=refuse):
        if event == "open":
            path, _, flags = args
            if path is None or isinstance(path, int):
                return
            if (flags or 0) & _writes and not _inside(path):
                _refuse(f"writing outside the folder: {path}")
            if not _inside(path) and _is_dir(path):
                _refuse(f"opening a folder outside the folder: {path}")
        elif event.startswith("socket."):
            _refuse(f"network ({event})")
        elif event in _refused:
            _refuse(event)
        elif event == "import" and args[0] in _imports:
            _refuse(f"importing {args[0]}")
        elif event in _paths:
            for path in args[:_paths[event]]:
                if path is not None and not _inside(path):
                    _refuse(f"{event} outside the folder: {path}")

    return hook


def main() -> None:
    folder, program, limits = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    posix.chdir(folder)
    with open(program, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, program, "exec")
    set_limits(limits)
    sys.argv = [program]
    sys.path.insert(0, folder)
    sys.addaudithook(make_hook(posix.getcwd()))
    exec(code, {"__name__": "__main__", "__file__": program, "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
