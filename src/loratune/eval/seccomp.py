"""The seccomp filter the code sandbox hands to bubblewrap (`bwrap --seccomp FD`).

Built with the system's libseccomp (Debian `libseccomp2`, loaded with ctypes in the evaluator,
never inside the sandbox) and exported as the compiled BPF program bwrap loads just before it
starts the interpreter. The namespaces already hide the network, the host's files and its
processes; the filter closes what namespaces leave open to a program that gets past the audit
hook: new processes (fork, vfork, clone without CLONE_THREAD: threads still work), device and
fifo nodes, other processes' memory and pidfds, mounts and new namespaces, kernel keyrings,
bpf, perf, userfaultfd, io_uring, file handles, and every socket but AF_UNIX. Such a call kills
the program with SIGSYS, which the sandbox reports as refused. Calls of another architecture
(i386 `int 0x80`, x32) are killed too: libseccomp's filter checks the architecture first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import tempfile

ALLOW = 0x7FFF0000
KILL_PROCESS = 0x80000000
CMP_NE, CMP_MASKED_EQ = 1, 7
AF_UNIX = 1
CLONE_THREAD = 0x00010000
FORBIDDEN = (
    "fork", "vfork", "mknod", "mknodat", "ptrace", "process_vm_readv", "process_vm_writev",
    "kcmp", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "mount", "umount2",
    "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "keyctl", "add_key", "request_key", "bpf",
    "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "name_to_handle_at", "open_by_handle_at", "init_module", "finit_module", "delete_module",
    "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "syslog",
    "quotactl", "fanotify_init", "lookup_dcookie", "personality", "iopl", "ioperm",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "vhangup", "move_pages", "migrate_pages", "mbind",
)


class ArgCmp(ctypes.Structure):
    """libseccomp's `struct scmp_arg_cmp`."""
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _library():
    name = ctypes.util.find_library("seccomp")
    if name is None:
        return None
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _add(lib, ctx, action: int, name: str, *cmps: ArgCmp) -> None:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number < 0:  # not a system call on this architecture (e.g. vfork on aarch64)
        return
    array = (ArgCmp * len(cmps))(*cmps) if cmps else None
    rc = lib.seccomp_rule_add_array(ctx, action, number, len(cmps), array)
    if rc < 0:
        raise OSError(-rc, f"libseccomp: cannot add a rule for {name}: {os.strerror(-rc)}")


def _rules(lib, ctx) -> None:
    for name in FORBIDDEN:
        _add(lib, ctx, KILL_PROCESS, name)
    _add(lib, ctx, KILL_PROCESS, "socket", ArgCmp(0, CMP_NE, AF_UNIX, 0))
    # a new process, not a thread (fork and posix_spawn go through clone)
    _add(lib, ctx, KILL_PROCESS, "clone", ArgCmp(0, CMP_MASKED_EQ, CLONE_THREAD, 0))
    # clone3's flags sit in memory a filter cannot read: glibc falls back to clone on ENOSYS
    _add(lib, ctx, 0x00050000 | errno.ENOSYS, "clone3")


@functools.cache
def compiled_filter() -> bytes | None:
    """The BPF program (bytes for `bwrap --seccomp`), or None without libseccomp."""
    lib = _library()
    if lib is None:
        return None
    ctx = lib.seccomp_init(ALLOW)
    if not ctx:
        raise OSError("libseccomp: seccomp_init failed")
    try:
        _rules(lib, ctx)
        with tempfile.TemporaryFile() as f:
            rc = lib.seccomp_export_bpf(ctx, f.fileno())
            if rc < 0:
                raise OSError(-rc, f"libseccomp: cannot export the filter: {os.strerror(-rc)}")
            f.seek(0)
            return f.read()
    finally:
        lib.seccomp_release(ctx)
