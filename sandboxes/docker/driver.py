"""The in-container half of the `docker` backend: a supervisor and the Python worker it forks.

The host starts each container with `python3 -u -c <this source> <json config>` as its main
process (under docker's init) and talks to it over the attached stdin / stdout in frames of a
4-byte big-endian length and JSON. Standard library only (any image with Python 3.8+); it never
imports `spo_agents`. Its processes, protocol and kills are described in docs/sandbox.md.
"""

import functools
import json
import os
import select
import signal
import socket
import struct
import sys
import time


class _CPUTimeExceeded(BaseException):
    """Raised in the user's code when its CPU-time budget for this call (`cpu_s`) is spent."""


def _read_exact(read, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(read):
    head = _read_exact(read, 4)
    if head is None:
        return None
    body = _read_exact(read, struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body.decode("utf-8"))


def _frame(obj):
    data = json.dumps(obj).encode("utf-8")
    return struct.pack(">I", len(data)) + data


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data) :]


class _Keep:
    """The first and the last `limit // 2` bytes of a stream, and how many bytes it had."""

    def __init__(self, limit):
        self.limit = max(int(limit), 0)
        self.half = self.limit // 2
        self.head, self.tail, self.total = bytearray(), bytearray(), 0

    def add(self, chunk):
        self.total += len(chunk)
        room = self.limit - self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk and self.half:
            self.tail += chunk
            if len(self.tail) > self.half:
                del self.tail[: len(self.tail) - self.half]

    def text(self):
        kept = len(self.head) + len(self.tail)
        if self.total <= kept:
            return bytes(self.head + self.tail).decode("utf-8", "replace"), False
        marker = "\n[... %d bytes of output cut ...]\n" % (self.total - kept)
        return self.head.decode("utf-8", "replace") + marker + self.tail.decode("utf-8", "replace"), True


def _oom_kills():
    """How many processes the kernel's OOM killer has killed in this container (cgroup v1 or v2)."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return 0


def _execute(code, namespace, counter, cpu_s):
    """Run one cell in `namespace`; returns `exit_status, exception, memory_error, cpu_exceeded`."""
    import linecache
    import traceback

    name = "<cell-%d>" % counter
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    exit_status, exception, memory_error, cpu_exceeded = 0, None, False, False
    if cpu_s:
        import resource

        def on_xcpu(signum, frame):
            raise _CPUTimeExceeded("the code used more than %s s of CPU time" % cpu_s)

        used = resource.getrusage(resource.RUSAGE_SELF)
        signal.signal(signal.SIGXCPU, on_xcpu)
        try:
            soft = int(used.ru_utime + used.ru_stime + float(cpu_s)) + 1
            resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))
        except (ValueError, OSError):
            pass
    try:
        exec(compile(code, name, "exec"), namespace)
    except SystemExit as e:
        if e.code is None:
            exit_status = 0
        elif isinstance(e.code, int):
            exit_status = e.code & 0xFF
        else:
            print(e.code, file=sys.stderr)
            exit_status = 1
    except BaseException as e:  # noqa: BLE001 - the user's failure is data
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        if isinstance(e, SyntaxError):
            tb = None
        exception = "".join(traceback.format_exception(type(e), e, tb))
        memory_error = isinstance(e, MemoryError)
        cpu_exceeded = isinstance(e, _CPUTimeExceeded)
        exit_status = 1
        try:
            sys.stderr.write(exception)
        except BaseException:  # noqa: BLE001 - a closed stderr is the user's doing
            pass
    finally:
        if cpu_s:
            import resource

            try:
                hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
                resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
            except (ValueError, OSError):
                pass
    return exit_status, exception, memory_error, cpu_exceeded


def _std_streams():
    """Fresh `sys.stdout` / `sys.stderr` on fds 1 and 2 (the code may have closed the old ones)."""
    import io

    for fd, name in ((1, "stdout"), (2, "stderr")):
        raw = io.FileIO(fd, "w", closefd=False)
        kw = dict(encoding="utf-8", errors="backslashreplace", line_buffering=True, write_through=True)
        setattr(sys, name, io.TextIOWrapper(raw, **kw))


def _worker(ctrl, stateless):
    """Read cells from the supervisor, run them, answer with the outcome (output goes to fds 1, 2)."""
    owner = os.getpid()
    spare = (os.dup(1), os.dup(2))  # to put fds 1 and 2 back if the code closes them
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    counter = 0
    read = ctrl.recv
    while True:
        msg = _recv(read)
        if msg is None:
            os._exit(0)
        counter += 1
        os.dup2(spare[0], 1)
        os.dup2(spare[1], 2)
        _std_streams()
        status, exception, memory_error, cpu_exceeded = _execute(msg["code"], namespace, counter, msg.get("cpu_s"))
        if os.getpid() != owner:  # a process the code forked must not come back here
            os._exit(0)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a broken stream is the user's doing
                pass
        outcome = dict(exit_status=status, exception=exception, memory_error=memory_error, cpu_exceeded=cpu_exceeded)
        ctrl.sendall(_frame(outcome))
        if stateless:
            os._exit(0)


class _Worker:
    def __init__(self, pid, ctrl, out_fd, err_fd):
        self.pid, self.ctrl, self.out_fd, self.err_fd = pid, ctrl, out_fd, err_fd
        self.status = None  # exit status, once reaped

    def poll(self):
        """Reap the worker if it exited; resume it if it stopped itself (SIGSTOP, SIGTSTP, ...),
        as a shell would not, but a sandbox must: a stopped worker would only run into the timeout."""
        if self.status is not None:
            return self.status
        try:
            pid, st = os.waitpid(self.pid, os.WNOHANG | os.WUNTRACED)
        except ChildProcessError:
            return None
        if not pid:
            return None
        if os.WIFSTOPPED(st):
            os.kill(self.pid, signal.SIGCONT)
            return None
        self.status = 128 + os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
        return self.status

    def close(self):
        for fd in (self.out_fd, self.err_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.ctrl.close()


def _fork_retrying():
    """`fork`, retried for a second while the process limit is still taken by dying processes."""
    for _ in range(50):
        try:
            return os.fork()
        except BlockingIOError:
            _reap()
            time.sleep(0.02)
    return os.fork()


def _start_worker(cfg, keep_fds, devnull_r):
    parent, child = socket.socketpair()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = _fork_retrying()
    if pid == 0:
        try:
            parent.close()
            for fd in (out_r, err_r) + tuple(keep_fds):
                os.close(fd)
            os.dup2(devnull_r, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.close(out_w)
            os.close(err_w)
            os.setsid()
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            try:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write("1000")  # the OOM killer takes the worker, never the supervisor
            except OSError:
                pass
            uid, gid = cfg.get("uid"), cfg.get("gid")
            if uid is not None and os.getuid() == 0:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            _worker(child, bool(cfg.get("stateless")))
        except BaseException:  # noqa: BLE001 - reported by the supervisor as a lost worker
            import traceback

            traceback.print_exc()
        os._exit(70)
    child.close()
    os.close(out_w)
    os.close(err_w)
    return _Worker(pid, parent, out_r, err_r)


def _others():
    """Pids in this container other than init, this process and zombies."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (1, me):
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(int(name))
    return found


def _reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _in_own_container():
    """Whether this process is the direct child of a container init (`--init`), so `kill(-1)`
    reaches nothing outside; checked each time, since from root outside one it kills the machine."""
    try:
        with open("/proc/1/comm") as f:
            init = f.read().strip()
    except OSError:
        return False
    return os.getppid() == 1 and init in ("docker-init", "tini", "catatonit", "dumb-init")


def _kill_all(worker=None):
    """SIGKILL every process but init and this one until none is left (at most 2 s); outside a
    container, only the worker and its process group."""
    if not _in_own_container():
        if worker is not None:
            for target in (-worker.pid, worker.pid):
                try:
                    os.kill(target, signal.SIGKILL)
                except OSError:
                    pass
        _reap()
        return
    deadline = time.monotonic() + 2.0
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        _reap()
        if not _others() or time.monotonic() > deadline:
            return
        time.sleep(0.005)


def _drain(fds, keeps, wait_s):
    """Read what the pipes still hold; stop at end of file, after `wait_s` without data, or after
    0.2 s in all (a process the code left behind may keep writing)."""
    open_fds = list(fds)
    deadline = time.monotonic() + 0.2 + max(wait_s, 0.0) * 10
    while open_fds and time.monotonic() < deadline:
        ready, _, _ = select.select(open_fds, [], [], wait_s)
        if not ready:
            return
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                keeps[fd].add(chunk)
            else:
                open_fds.remove(fd)


def _supervise(worker, msg, cfg):
    """Send one cell to the worker and collect its outcome within the call's timeout."""
    limit = int(cfg.get("max_output_bytes", 65536))
    keeps = {worker.out_fd: _Keep(limit), worker.err_fd: _Keep(limit)}
    _drain([worker.out_fd, worker.err_fd], {worker.out_fd: _Keep(0), worker.err_fd: _Keep(0)}, 0.0)
    oom_before = _oom_kills()
    start = time.monotonic()
    deadline = start + float(msg.get("timeout") or 10.0)
    worker.ctrl.sendall(_frame({"code": msg["code"], "cpu_s": msg.get("cpu_s")}))
    reply, timed_out = None, False
    watch = [worker.ctrl, worker.out_fd, worker.err_fd]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select(watch, [], [], min(left, 0.05))
        if not ready:
            worker.poll()
            continue
        if worker.ctrl in ready:
            reply = _recv(worker.ctrl.recv)
            break
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                keeps[fd].add(chunk)
            else:
                watch.remove(fd)
    duration = time.monotonic() - start
    fields = dict(timed_out=timed_out, worker_lost=reply is None, duration_s=duration, exit_status=0)
    fields.update(exception=None, memory_error=False, cpu_exceeded=False)
    if reply is not None:
        # The worker flushed before answering: its output is in the pipes already.
        _drain([fd for fd in watch if fd != worker.ctrl], keeps, 0.0)
        fields.update(reply)
    else:
        status = None
        if not timed_out:  # the worker died by itself (or closed its channel): its status
            wait_until = min(deadline, time.monotonic() + 0.5)
            while True:
                status = worker.poll()
                if status is not None or time.monotonic() > wait_until:
                    break
                time.sleep(0.005)
        _kill_all(worker)
        _drain([fd for fd in watch if fd != worker.ctrl], keeps, 0.02)
        if timed_out:
            fields["exit_status"] = 137
        else:
            fields["exit_status"] = status if status is not None else 137
            fields["cpu_exceeded"] = status == 128 + signal.SIGXCPU
    (stdout, cut_out), (stderr, cut_err) = keeps[worker.out_fd].text(), keeps[worker.err_fd].text()
    fields.update(
        stdout=stdout, stderr=stderr, output_truncated=cut_out or cut_err, oom_kills=_oom_kills() - oom_before
    )
    return fields


def main():
    cfg = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    chan_in, chan_out = os.dup(0), os.dup(1)
    devnull_r = os.open(os.devnull, os.O_RDONLY)
    devnull_w = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull_r, 0)
    os.dup2(devnull_w, 1)
    os.dup2(devnull_w, 2)
    os.close(devnull_w)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if cfg.get("workdir"):
        os.chdir(cfg["workdir"])
    import io  # noqa: F401,E401 - every worker needs them; forks inherit them

    for name in cfg.get("preload", ()):  # imported once here, inherited by every forked worker
        try:
            __import__(name)
        except ImportError:
            pass
    stateless = bool(cfg.get("stateless"))
    keep_fds = (chan_in, chan_out)
    worker = _start_worker(cfg, keep_fds, devnull_r)
    _write_all(chan_out, _frame({"op": "ready", "pid": os.getpid(), "python": sys.version.split()[0]}))

    read = functools.partial(os.read, chan_in)
    while True:
        msg = _recv(read)
        if msg is None:
            _kill_all(worker)
            os._exit(0)
        fields = _supervise(worker, msg, cfg)
        if fields["worker_lost"] or stateless:
            if not fields["worker_lost"]:
                _kill_all(worker)  # stateless: nothing the call started outlives it
            worker.close()
            _reap()
            worker = _start_worker(cfg, keep_fds, devnull_r)  # ready before the next call
        _write_all(chan_out, _frame(fields))


if __name__ == "__main__":
    main()
