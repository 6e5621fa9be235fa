"""The in-container half of the `docker` backend: one persistent Python interpreter per container.

The host starts each container with `python3 -u -c <this source> <json config>` as its main
process (under docker's init) and talks to it over the container's attached stdin / stdout, so
this file uses the standard library only and never imports `spo_agents`. It works with any
image that has Python 3.8+.

Protocol (4-byte big-endian length + UTF-8 JSON, both ways): the driver sends `{"op": "ready"}`
once, then answers each `{"code", "cpu_s"}` with `{"stdout", "stderr", "stdout_bytes",
"stderr_bytes", "exit_status", "exception", "memory_error", "cpu_exceeded", "oom_kills",
"duration_s"}`. The driver exits when its stdin closes (the host went away), which stops the
container.

The protocol channel is a private duplicate of the container's stdin / stdout. File descriptors
0, 1 and 2 seen by the user's code are /dev/null, a stdout pipe and a stderr pipe during a run,
and /dev/null between runs, so nothing the code (or a process it leaves behind) writes or reads
can reach the channel through them. Code that looks up the channel's descriptors can still forge
its own answer: the result is only as trustworthy as the code that produced it. Wall-clock
timeouts, memory and process limits are enforced outside this process (by the host and the
container's cgroups), never by this file.

Stateless sessions fork a fresh child of the pristine driver for every run (nothing the previous
run defined survives); stateful sessions run the code in the driver itself.
"""

import json
import os
import select
import signal
import struct
import sys
import threading
import time


class _CPUTimeExceeded(BaseException):
    """Raised in the user's code when its CPU-time budget for this run (`cpu_s`) is spent."""


def _read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(fd):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    body = _read_exact(fd, struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body.decode("utf-8"))


def _send(fd, obj):
    data = json.dumps(obj).encode("utf-8")
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


class _Stream:
    """Drains one pipe in a thread, keeping the first and the last `limit // 2` bytes."""

    def __init__(self, fd, limit):
        self.fd, self.limit = fd, max(int(limit), 0)
        self.head, self.tail, self.total = bytearray(), bytearray(), 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        half = self.limit // 2
        stopped_at = None
        while True:
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if self.stop.is_set():
                # After the run, drain what is buffered; a process the code left behind that
                # keeps writing gets at most 0.1 s more.
                stopped_at = stopped_at or time.monotonic()
                if not ready or time.monotonic() - stopped_at > 0.1:
                    return
            elif not ready:
                continue
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return
            self.total += len(chunk)
            if len(self.head) < self.limit - half:
                take = self.limit - half - len(self.head)
                self.head += chunk[:take]
                chunk = chunk[take:]
            if chunk and half:
                self.tail += chunk
                if len(self.tail) > half:
                    del self.tail[: len(self.tail) - half]

    def text(self):
        """The kept bytes; when the middle was cut, a marker says how much."""
        self.thread.join()
        os.close(self.fd)
        kept = len(self.head) + len(self.tail)
        if self.total <= kept:
            data = bytes(self.head + self.tail)
            return data.decode("utf-8", "replace"), False
        cut = self.total - kept
        marker = "\n[... %d bytes of output cut ...]\n" % cut
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
    """Run one cell in `namespace`; returns the result fields besides the output."""
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
        soft = int(used.ru_utime + used.ru_stime + float(cpu_s)) + 1
        signal.signal(signal.SIGXCPU, on_xcpu)
        try:
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
    return {"exit_status": exit_status, "exception": exception, "memory_error": memory_error,
            "cpu_exceeded": cpu_exceeded}


def _run(msg, namespace, counter, cfg, devnull_r, devnull_w):
    """Redirect fds 0-2, run the cell, collect its output; fds are restored afterwards."""
    limit = int(cfg.get("max_output_bytes", 65536))
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    streams = (_Stream(out_r, limit), _Stream(err_r, limit))
    saved = (sys.stdin, sys.stdout, sys.stderr)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)
    oom_before = _oom_kills()
    owner = os.getpid()
    start = time.monotonic()
    try:
        fields = _execute(msg["code"], namespace, counter, msg.get("cpu_s"))
    finally:
        if os.getpid() != owner:  # a process the code forked must not come back to the driver
            os._exit(0)
        duration = time.monotonic() - start
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a broken stream is the user's doing
                pass
        sys.stdin, sys.stdout, sys.stderr = saved
        os.dup2(devnull_r, 0)
        os.dup2(devnull_w, 1)
        os.dup2(devnull_w, 2)
        for s in streams:
            s.stop.set()
    (stdout, out_cut), (stderr, err_cut) = (s.text() for s in streams)
    fields.update(stdout=stdout, stderr=stderr, stdout_bytes=streams[0].total, stderr_bytes=streams[1].total,
                  output_truncated=out_cut or err_cut, oom_kills=_oom_kills() - oom_before,
                  duration_s=duration)
    return fields


def _run_forked(msg, counter, cfg, devnull_r, devnull_w):
    """Stateless run: a fresh child of the pristine driver runs the cell and reports by a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fields = _run(msg, {"__name__": "__main__", "__builtins__": __builtins__}, counter, cfg,
                          devnull_r, devnull_w)
            data = json.dumps(fields).encode("utf-8")
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if chunks:
        return json.loads(b"".join(chunks).decode("utf-8"))
    code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return {"stdout": "", "stderr": "", "stdout_bytes": 0, "stderr_bytes": 0, "output_truncated": False,
            "exit_status": code or 1, "exception": "the interpreter exited with status %d" % code,
            "memory_error": False, "cpu_exceeded": False, "oom_kills": 0, "duration_s": 0.0,
            "crashed": True}


def main():
    cfg = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    chan_in, chan_out = os.dup(0), os.dup(1)  # non-inheritable: user processes never get them
    devnull_r = os.open(os.devnull, os.O_RDONLY)
    devnull_w = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull_r, 0)
    os.dup2(devnull_w, 1)
    os.dup2(devnull_w, 2)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if cfg.get("workdir"):
        os.makedirs(cfg["workdir"], exist_ok=True)
        os.chdir(cfg["workdir"])
    for name in cfg.get("preload", ()):
        try:
            __import__(name)
        except ImportError:
            pass
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    _send(chan_out, {"op": "ready", "pid": os.getpid(), "python": sys.version.split()[0]})
    counter = 0
    while True:
        msg = _recv(chan_in)
        if msg is None:
            os._exit(0)
        counter += 1
        if cfg.get("stateless"):
            fields = _run_forked(msg, counter, cfg, devnull_r, devnull_w)
        else:
            fields = _run(msg, namespace, counter, cfg, devnull_r, devnull_w)
        _send(chan_out, fields)


if __name__ == "__main__":
    main()
