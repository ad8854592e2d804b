"""The daemon's control socket: one JSON request per line, one JSON reply per line.

The CLI (and any failover agent) talks to a running daemon only through this socket, so every
operation is scriptable: `{"cmd": "status"}` → `{"ok": true, "result": {...}}`, errors as
`{"ok": false, "error": "one line"}`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any]


class ControlError(Exception):
    """An operation the daemon refused, or a daemon that cannot be reached."""


class ControlServer:
    """Serves requests on a unix socket from a background thread."""

    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._closed = threading.Event()

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._claim_path()
        self._sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self._sock.listen(8)
        self._thread.start()

    def _claim_path(self) -> None:
        """Refuse to steal the socket of a live daemon; remove one left by a dead daemon."""
        if not os.path.exists(self.path):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)
            return
        finally:
            probe.close()
        raise ControlError(f"{self.path}: another vscsi daemon is running (stop it first)")

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                f.write(json.dumps(self._dispatch(line)).encode() + b"\n")
                f.flush()

    def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            handler = self.handlers.get(req.get("cmd", ""))
            if handler is None:
                return {"ok": False, "error": f"unknown command {req.get('cmd')!r}"}
            return {"ok": True, "result": handler(req)}
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:
            log.exception("control request failed: %r", line)
            return {"ok": False, "error": f"internal error: {e}"}

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def request(path: str, cmd: str, timeout: float = 30.0, **args: Any) -> Any:
    """Send one request and return its result, or raise ControlError with the daemon's reason."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        reason = f"no vscsi daemon at {path} ({e.strerror}); start one with 'vscsi up'"
        raise ControlError(reason) from None
    with s, s.makefile("rwb") as f:
        f.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        f.flush()
        line = f.readline()
    if not line:
        raise ControlError(f"the daemon at {path} closed the connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply.get("result")
