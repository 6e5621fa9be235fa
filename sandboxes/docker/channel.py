"""The host's end of one sandbox container: its attached stream, split into the driver's channel.

Docker multiplexes a non-TTY container's stdout and stderr on one attached socket; `Box` splits
it, reads the driver's frames (a 4-byte big-endian length and JSON) from stdout and keeps the
first 64 KiB of stderr for start-up errors.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pool import Key


class EngineGone(Exception):
    """The container's stream closed: the driver (or the whole container) exited."""


class Box:
    """One running container and the demultiplexed stream to its driver."""

    def __init__(self, cid: str, sock: socket.socket, key: Key) -> None:
        self.id, self.sock, self.key = cid, sock, key
        self._raw = bytearray()  # docker's multiplexed stream, not yet split
        self._out = bytearray()  # the driver's channel (stdout stream)
        self.err = bytearray()  # the container's stderr stream (start-up failures), capped

    def send(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.sock.settimeout(30.0)
        try:
            self.sock.sendall(struct.pack(">I", len(data)) + data)
        except OSError as e:
            raise EngineGone(str(e)) from e

    def recv(self, deadline: float) -> dict[str, Any]:
        """The next message; `socket.timeout` past `deadline`, `EngineGone` on end of stream."""
        while True:
            if len(self._out) >= 4:
                (n,) = struct.unpack(">I", self._out[:4])
                if len(self._out) >= 4 + n:
                    body = bytes(self._out[4 : 4 + n])
                    del self._out[: 4 + n]
                    return json.loads(body.decode("utf-8"))
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("deadline passed")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                raise
            except OSError as e:
                raise EngineGone(str(e)) from e
            if not chunk:
                raise EngineGone("end of stream")
            self._demux(chunk)

    def _demux(self, chunk: bytes) -> None:
        # Docker's attach stream for a non-TTY container: 8-byte header (stream, 0, 0, 0,
        # big-endian payload size), then the payload.
        self._raw += chunk
        while len(self._raw) >= 8:
            stream, size = self._raw[0], struct.unpack(">I", self._raw[4:8])[0]
            if len(self._raw) < 8 + size:
                return
            payload = bytes(self._raw[8 : 8 + size])
            del self._raw[: 8 + size]
            if stream == 1:
                self._out += payload
            elif len(self.err) < 65536:
                self.err += payload[: 65536 - len(self.err)]

    def alive(self) -> bool:
        """False when the container's end of the stream has closed (checked without blocking)."""
        try:
            ready, _, _ = select.select([self.sock], [], [], 0)
            return not ready or self.sock.recv(1, socket.MSG_PEEK) != b""
        except (OSError, ValueError):
            return False

    def close_stream(self) -> None:
        # shutdown first: it wakes a thread blocked in `recv` on this socket (close alone does not).
        for op in (lambda: self.sock.shutdown(socket.SHUT_RDWR), self.sock.close):
            try:
                op()
            except OSError:
                pass
