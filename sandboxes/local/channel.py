"""The host's ends of one session process: its output capture, its control channel, its hello.

A runner (one forked session, see `worker.py`) talks over a stream socket in frames of a 4-byte
big-endian length and JSON; its stdout and stderr arrive on two pipes, of which `Capture` keeps
the head and the tail.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

_READ_CHUNK = 1 << 18
_CREDENTIALS_SPACE = socket.CMSG_SPACE(struct.calcsize("3i"))  # struct ucred: pid, uid, gid


class Capture:
    """Keeps the head and the tail of a byte stream, at most `limit` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = max(int(limit), 0)
        self.reset()

    def reset(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        half = self.limit // 2
        room = self.limit - half
        if len(self.head) < half:
            take = half - len(self.head)
            self.head += data[:take]
            data = data[take:]
        if data:
            self.tail += data
            if len(self.tail) > room:
                del self.tail[: len(self.tail) - room]

    def take(self) -> tuple[str, bool]:
        kept = len(self.head) + len(self.tail)
        truncated = self.total > kept
        if truncated:
            cut = self.total - kept
            text = (
                self.head.decode("utf-8", "replace")
                + f"\n... [{cut} bytes truncated] ...\n"
                + self.tail.decode("utf-8", "replace")
            )
        else:
            text = (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        self.reset()
        return text, truncated


class Runner:
    """One forked session process tree and the host ends of its channels.

    `pid` and `pgid` are the zygote's view of it (its pid namespace); `generation` is the start of
    the worker that forked it (`Zygote.generation`); `host_pid` is the session process as this
    process sees it."""

    def __init__(
        self, pid: int, pgid: int, generation: int, ctrl: socket.socket, out_fd: int, err_fd: int, limit: int
    ) -> None:
        self.pid, self.pgid, self.generation = pid, pgid, generation
        self.host_pid: int | None = None
        self.ctrl = ctrl
        self.fds = {"stdout": out_fd, "stderr": err_fd}
        self.captures = {"stdout": Capture(limit), "stderr": Capture(limit)}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.workdir: str | None = None  # a host temp dir (isolation `none` only), removed on kill
        self.cgroup: Path | None = None  # its pids cgroup (root only, see `PidsCap`), removed on kill

    def on_readable(self, name: str) -> None:
        fd = self.fds[name]
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            assert self.loop is not None
            self.loop.remove_reader(fd)
            return
        self.captures[name].feed(data)

    def drain(self) -> None:
        """Read what is already in the pipes (bounded, in case something keeps writing)."""
        for name, fd in self.fds.items():
            for _ in range(64):
                try:
                    data = os.read(fd, _READ_CHUNK)
                except (BlockingIOError, OSError):
                    break
                if not data:
                    break
                self.captures[name].feed(data)

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.writer is not None
        data = json.dumps(obj).encode()
        self.writer.write(struct.pack(">I", len(data)) + data)
        await self.writer.drain()

    async def recv(self) -> dict[str, Any] | None:
        assert self.reader is not None
        try:
            head = await self.reader.readexactly(4)
            (n,) = struct.unpack(">I", head)
            return json.loads(await self.reader.readexactly(n))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        if self.loop is not None:
            for fd in self.fds.values():
                try:
                    self.loop.remove_reader(fd)
                except (ValueError, RuntimeError):
                    pass
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        if self.writer is not None:
            self.writer.close()
        else:
            self.ctrl.close()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def read_hello(sock: socket.socket, timeout: float) -> tuple[dict[str, Any] | None, int | None]:
    """The runner's first frame, and the pid of the process that sent it as this process sees it.

    With SO_PASSCRED on the receiving socket, the kernel stamps every message with its sender's
    credentials and translates the pid into the receiver's pid namespace. The first frame is sent
    by the runner itself before any user code exists, so this pid is the session's host pid,
    however deeply its pid namespaces nest. (None, pid) when it hung up or timed out first."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    fd = sock.fileno()
    buf = bytearray()
    pid = None
    deadline = loop.time() + timeout
    while True:
        want = 4 - len(buf) if len(buf) < 4 else 4 + struct.unpack(">I", buf[:4])[0] - len(buf)
        if len(buf) >= 4 and want == 0:
            return json.loads(bytes(buf[4:])), pid
        try:
            data, ancdata, _, _ = sock.recvmsg(want, _CREDENTIALS_SPACE)
        except BlockingIOError:
            readable = loop.create_future()
            loop.add_reader(fd, _wake, readable)
            try:
                await asyncio.wait_for(readable, max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                return None, pid
            finally:
                loop.remove_reader(fd)
            continue
        except OSError:
            return None, pid
        if not data:
            return None, pid
        for level, kind, value in ancdata:
            if pid is None and level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", value[: struct.calcsize("3i")])[0]
        buf += data
