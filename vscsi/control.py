"""The daemon's control socket: one JSON request per line, one JSON reply per line.

The CLI (and any failover agent) talks to a running daemon only through this socket, so every
operation is scriptable: `{"cmd": "status"}` → `{"ok": true, "result": {...}}`, errors as
`{"ok": false, "error": "one line"}`.

The socket can overwrite any store the daemon may open, so it is 0600 from the moment it exists
and every connection's peer is checked (SO_PEERCRED): root and the daemon's own user may run
everything, members of `[daemon] socket_group` (the socket is then 0660) only the read-only
commands, nobody else anything. Every command declares its arguments once (`Command`); a
request with a missing, unknown or wrongly typed argument is refused before its handler runs.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/vscsi/vscsi.sock"
Handler = Callable[[dict[str, Any]], Any]
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13: the peer's supplementary groups
_TYPES: dict[type, str] = {str: "a string", int: "an integer", bool: "a JSON bool (true/false)"}


class ControlError(Exception):
    """An operation the daemon refused, or a daemon that cannot be reached; `exit_status` is
    what the CLI exits with (CCI's codes for remote pair operations, else 1)."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@dataclass(frozen=True)
class Command:
    """One control command: its handler, its arguments (name -> str, int or bool) and whether
    members of the socket group may run it."""

    handler: Handler
    required: dict[str, type] = field(default_factory=dict)
    optional: dict[str, type] = field(default_factory=dict)
    read_only: bool = False

    def check(self, cmd: str, args: dict[str, Any]) -> None:
        """Refuse, in one line, an argument that is missing, unknown or of the wrong type."""
        for name in self.required:
            if name not in args:
                raise ControlError(f"{cmd}: argument {name!r} is required")
        for name, value in args.items():
            kind = self.required.get(name) or self.optional.get(name)
            if kind is None:
                known = ", ".join([*self.required, *self.optional]) or "none"
                raise ControlError(f"{cmd}: unknown argument {name!r} (known: {known})")
            if type(value) is not kind:  # exact: a bool is not an int, "false" is not a bool
                raise ControlError(f"{cmd}: {name} must be {_TYPES[kind]}, got {value!r}")


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def peer_of(conn: socket.socket) -> Peer:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    try:
        groups = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)  # Python's largest
    except OSError:  # ERANGE: more than 256 groups; the primary group still counts
        groups = b""
    return Peer(*struct.unpack("3i", raw), struct.unpack(f"{len(groups) // 4}I", groups))


class ControlServer:
    """Serves requests on a unix socket from a background thread."""

    def __init__(self, path: str, commands: dict[str, Command], group: str | None = None) -> None:
        self.path = path
        self.commands = commands
        self.group = group
        self._gid = grp.getgrnam(group).gr_gid if group is not None else None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._closed = threading.Event()

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._claim_path()
        self._bind()
        self._sock.listen(8)
        self._thread.start()

    def _bind(self) -> None:
        """Create the socket 0600 (no moment with wider access), then open it to the group."""
        old = os.umask(0o177)
        try:
            self._sock.bind(self.path)
        finally:
            os.umask(old)
        if self._gid is not None:
            os.chown(self.path, -1, self._gid)
            os.chmod(self.path, 0o660)

    def _claim_path(self) -> None:
        """Refuse to steal the socket of a live daemon; remove one left by a dead daemon; never
        remove anything that is not a socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(
                f"{self.path} exists and is not a socket (remove it, or set daemon.socket)"
            )
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
        peer = peer_of(conn)
        with conn, conn.makefile("rwb") as f:
            for line in f:
                f.write(json.dumps(self.dispatch(line, peer)).encode() + b"\n")
                f.flush()
                if self.access(peer) is None:
                    return  # one answer, then the connection is closed

    def access(self, peer: Peer) -> str | None:
        """ "all" for root and the daemon's user, "read" for the socket group, else None."""
        if peer.uid in (0, os.geteuid()):
            return "all"
        if self._gid is not None and self._gid in (peer.gid, *peer.groups):
            return "read"
        return None

    def dispatch(self, line: bytes, peer: Peer) -> dict[str, Any]:
        """One request from `peer`: checked for access and argument types, then handled."""
        access = self.access(peer)
        if access is None:
            log.warning("control socket: refused uid %d (pid %d)", peer.uid, peer.pid)
            return _error(f"uid {peer.uid} may not use the vscsi control socket (root only)")
        try:
            req = json.loads(line)
        except ValueError:
            return _error("a request is one line of JSON")
        try:
            return {"ok": True, "result": self._run(req, access)}
        except ControlError as e:
            return _error(str(e), e.exit_status)
        except Exception as e:
            log.exception("control request failed: %r", line)
            return _error(f"internal error: {e}")

    def _run(self, req: object, access: str) -> Any:
        if not isinstance(req, dict):
            raise ControlError("a request is a JSON object")
        cmd = req.pop("cmd", None)
        command = self.commands.get(cmd) if isinstance(cmd, str) else None
        if command is None:
            raise ControlError(f"unknown command {cmd!r}")
        if access != "all" and not command.read_only:
            log.warning("control socket: refused %s to the group %s", cmd, self.group)
            raise ControlError(f"{cmd}: group {self.group} may run read-only commands only")
        command.check(cmd, req)
        return command.handler(req)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _error(message: str, exit_status: int = 1) -> dict[str, Any]:
    return {"ok": False, "error": message, "exit": exit_status}


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
        raise ControlError(reply.get("error", "unknown error"), int(reply.get("exit", 1)))
    return reply.get("result")
