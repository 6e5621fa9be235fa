"""The in-sandbox half of the `local` backend: a pre-warmed zygote that forks one runner per session.

It runs inside the sandbox with the sandbox's interpreter (`python -I -c <this source>`), so it
uses the standard library only and never imports `spo_agents`. Its processes and its two
protocols (host <-> zygote, host <-> runner) are described in docs/sandbox.md.
"""

import ctypes
import json
import math
import os
import signal
import socket
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 1, 38, 24
PR_SET_CHILD_SUBREAPER = 36
SYS_MOUNT_SETATTR = 442  # x86-64 and aarch64 share it
MOUNT_ATTR_RDONLY, AT_RECURSIVE, AT_FDCWD = 0x1, 0x8000, -100

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option, arg):
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def _mount(source, target, fstype, flags, data=None):
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _readonly_root():
    """Make every mount read-only (recursively); later tmpfs mounts stay writable."""
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY, 0, 0, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, buf, len(attr)), "mount_setattr /")


def _drop_capabilities():
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(_libc.capset(header, data), "capset")


def _status(waitstatus):
    if os.WIFSIGNALED(waitstatus):
        return 128 + os.WTERMSIG(waitstatus)
    return os.WEXITSTATUS(waitstatus)


def _exit_reply(waitstatus):
    """`{status, signal}` of a raw wait status (`null`s for a process still running)."""
    if waitstatus is None:
        return {"status": None, "signal": None}
    sig = os.WTERMSIG(waitstatus) if os.WIFSIGNALED(waitstatus) else None
    return {"status": _status(waitstatus), "signal": sig}


# --- runner ------------------------------------------------------------------------------------
def _send(sock, obj):
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv(sock):
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (n,) = struct.unpack(">I", head)
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return json.loads(bytes(buf))


def _apply_limits(limits):
    import resource

    def setlim(which, value):
        if value is not None:
            value = int(value)
            resource.setrlimit(which, (value, value))

    if limits.get("memory_mb"):
        with open("/proc/self/statm") as f:
            vm_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        setlim(resource.RLIMIT_AS, vm_bytes + int(limits["memory_mb"]) * 2**20)
    setlim(resource.RLIMIT_NOFILE, limits.get("max_open_files"))
    if limits.get("max_file_size_mb"):
        setlim(resource.RLIMIT_FSIZE, int(limits["max_file_size_mb"]) * 2**20)
    setlim(resource.RLIMIT_CORE, 0)


def _execute(code, name, namespace, echo):
    """exec `code`; with `echo`, a final expression statement's value is printed, as in a REPL."""
    if not echo:
        exec(compile(code, name, "exec"), namespace)
        return
    import ast

    tree = ast.parse(code, name, "exec")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, name, "exec"), namespace)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), name, "eval"), namespace)
        if value is not None:
            print(repr(value))


def _run_cell(code, namespace, counter, echo=False):
    import linecache
    import traceback

    name = f"<cell-{counter}>"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    exit_status, exception, memory_error = 0, None, False
    try:
        _execute(code, name, namespace, echo)
    except SystemExit as e:
        if e.code is None:
            exit_status = 0
        elif isinstance(e.code, int):
            exit_status = e.code & 0xFF
        else:
            print(e.code, file=sys.stderr)
            exit_status = 1
    except BaseException as e:  # noqa: BLE001 - the user's failure is data
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":  # this worker's own frames
            tb = tb.tb_next
        if isinstance(e, SyntaxError):
            tb = None
        exception = "".join(traceback.format_exception(type(e), e, tb))
        memory_error = isinstance(e, MemoryError)
        exit_status = 1
        try:
            sys.stderr.write(exception)
        except BaseException:  # noqa: BLE001
            pass
    return exit_status, exception, memory_error


def _restore_streams(saved):
    """Undo what the previous cell did to fds 1 and 2 and to `sys.stdout` / `sys.stderr`."""
    import io

    for fd, keep in zip((1, 2), saved):
        try:
            os.dup2(keep, fd)
        except OSError:
            pass
    for name, fd in (("stdout", 1), ("stderr", 2)):
        orig = getattr(sys, f"__{name}__")
        if orig is None or orig.closed or not getattr(orig, "_spo_stream", False):
            # Line-buffered like a terminal, so output printed before a hang or a crash is kept.
            orig = io.TextIOWrapper(
                io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
            )
            orig._spo_stream = True
            setattr(sys, f"__{name}__", orig)
        setattr(sys, name, orig)


def _runner(ctrl, limits, workdir):
    import faulthandler
    import resource

    os.chdir(workdir)
    faulthandler.enable()  # a crash in C code leaves a Python traceback on stderr
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes fail with EFBIG instead
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _apply_limits(limits)
    if limits.get("drop_capabilities"):
        _drop_capabilities()
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    saved = (os.dup(1), os.dup(2))
    _send(ctrl, {"op": "ready"})
    counter = 0
    while True:
        msg = _recv(ctrl)
        if msg is None:
            os._exit(0)
        counter += 1
        cpu_s = msg.get("cpu_s")
        if cpu_s:
            used = resource.getrusage(resource.RUSAGE_SELF)
            soft = math.ceil(used.ru_utime + used.ru_stime + float(cpu_s))
            try:
                resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))
            except (ValueError, OSError):
                pass
        _restore_streams(saved)
        exit_status, exception, memory_error = _run_cell(msg["code"], namespace, counter, bool(msg.get("echo")))
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a closed or broken stream is the user's doing
                pass
        _send(ctrl, {"exit_status": exit_status, "exception": exception, "memory_error": memory_error})


# --- session set-up ----------------------------------------------------------------------------
def _own_user_namespace(extra_flags):
    """unshare a user namespace (plus `extra_flags`) mapping only our own uid and gid."""
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(CLONE_NEWUSER | extra_flags), "unshare")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _terminate_on(sig):
    def handler(signum, frame):
        os._exit(128 + signum)

    signal.signal(sig, handler)


def _session(ctrl, out_fd, err_fd, cfg, limits):
    """Set the runner up (namespaces, mounts, fds), then serve calls until the host hangs up."""
    import resource

    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()
    workdir = limits.get("workdir") or cfg["workdir"]
    if limits.get("workdir"):
        os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    if limits.get("max_processes"):
        # Set before the user namespace exists, so namespaces the code nests inside inherit it.
        n = int(limits["max_processes"]) + 1
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
    if cfg["namespaces"]:
        _own_user_namespace(CLONE_NEWNS | (CLONE_NEWNET if cfg["new_net"] else 0))
        _mount("none", "/", None, MS_REC | MS_PRIVATE)
        if cfg["readonly_root"]:
            _readonly_root()
        for path in cfg["hide"]:
            if os.path.isdir(path):
                _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        size = limits.get("disk_mb") or 256
        _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(size)}m,mode=0777")
        # pid 1 ignores signals it has no handler for; give the usual ones their default effect
        # (SIGABRT goes to faulthandler, whose re-raise ends in a forced fault).
        for sig in (
            signal.SIGTERM,
            signal.SIGHUP,
            signal.SIGQUIT,
            signal.SIGUSR1,
            signal.SIGUSR2,
            signal.SIGALRM,
            signal.SIGXCPU,
        ):
            _terminate_on(sig)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    keep = ctrl.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 16)
    _runner(ctrl, limits, workdir)


# --- zygote ------------------------------------------------------------------------------------
def _zygote(sock, cfg):
    _prctl(PR_SET_CHILD_SUBREAPER, 1)  # isolation `none`: orphans come back here to be reaped
    for name in cfg["preload"]:
        try:
            __import__(name)
        except ImportError:
            pass
    import gc

    gc.collect()
    gc.freeze()  # keep the collector from touching (and so copying) the pre-imported objects
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY) if cfg["namespaces"] else None
    sock.send(json.dumps({"op": "ready", "pid": os.getpid()}).encode())
    runners = set()
    exited = {}  # runner pid -> raw wait status, for runners reaped while waiting for another
    abandoned = set()  # killed without waiting: reaped whenever they are done, status dropped

    def collect(got, st):
        if got in abandoned:
            abandoned.discard(got)
            runners.discard(got)
        elif got in runners:
            exited[got] = st

    def reap(pid, block):
        if pid in exited:
            runners.discard(pid)
            return exited.pop(pid)
        while True:
            try:
                got, st = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return None
            if got == 0:
                return None
            collect(got, st)
            if got == pid:
                runners.discard(pid)
                return exited.pop(pid, None)

    def sweep():
        while True:
            try:
                got, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if got == 0:
                return
            collect(got, st)

    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 3)
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)
        req = json.loads(msg)
        op = req["op"]
        sweep()
        if op == "spawn":
            if own_pid_ns is not None:
                _check(_libc.unshare(CLONE_NEWPID), "unshare pid")  # the next child is pid 1 there
            runner = os.fork()
            if runner == 0:
                try:
                    sock.close()
                    ctrl = socket.socket(fileno=fds[0])
                    _session(ctrl, fds[1], fds[2], cfg, req["limits"])
                except BaseException as e:  # noqa: BLE001 - reported to the host as a set-up failure
                    try:
                        _send(socket.socket(fileno=fds[0]), {"op": "error", "error": f"{type(e).__name__}: {e}"})
                    finally:
                        os._exit(70)
                os._exit(0)
            if own_pid_ns is not None:
                _check(_libc.setns(own_pid_ns, CLONE_NEWPID), "setns pid")  # back to our own
            for fd in fds:
                os.close(fd)
            runners.add(runner)
            sock.send(json.dumps({"pid": runner, "pgid": runner}).encode())
        elif op == "kill":
            pid = req["pid"]
            # A runner with namespaces is pid 1 of its own: its death ends everything in there.
            targets = [pid] if cfg["namespaces"] else [-req["pgid"], pid]
            if pid in runners and pid not in exited and pid not in abandoned:
                for target in targets:
                    try:
                        os.kill(target, signal.SIGKILL)
                    except OSError:
                        pass
            if req.get("wait", True) or pid in exited:
                status = reap(pid, True)
            else:
                abandoned.add(pid)  # its teardown goes on while the next session starts
                status = None
            sock.send(json.dumps(_exit_reply(status)).encode())
        elif op == "wait":
            sock.send(json.dumps(_exit_reply(reap(req["pid"], bool(req.get("block"))))).encode())
        else:
            sock.send(json.dumps({"error": f"unknown op {op!r}"}).encode())


def main():
    cfg = json.loads(sys.argv[1])
    sock = socket.socket(fileno=int(cfg["fd"]))
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if cfg["namespaces"]:
        if cfg["drop_to"] is not None and os.geteuid() == 0:
            uid = gid = int(cfg["drop_to"])
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # set-id changes clear the death signal
        # A pid namespace owned by a user namespace of our own: the zygote may then create a pid
        # namespace per session and return to its own afterwards.
        _own_user_namespace(CLONE_NEWPID | (CLONE_NEWNET if cfg["zygote_net"] else 0))
        zygote = os.fork()
        if zygote:
            sock.close()
            _, st = os.waitpid(zygote, 0)
            os._exit(_status(st))
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _zygote(sock, cfg)


if __name__ == "__main__":
    main()
