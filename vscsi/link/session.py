"""The link sessions: `LinkSession`, the P side's connection to one peer array, and
`LinkServer`, the S side that accepts peers and applies their requests to local volumes.

Plain threads over `TlsStream`, no event loop: on the P side the caller's thread sends its own
request and one receiver thread per connection hands each answer to the caller waiting for
it, so many requests are in flight at once on one connection; on the S side one thread per
connection reads and applies in order, answering the requests it read together in one send,
while WRITEs that wait for their device run beside it (`_Beside`) with the outcome of the same
order.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from construct import Container

from vscsi.config import LinkConfig, RemoteConfig
from vscsi.link import netns as link_netns
from vscsi.link import tls
from vscsi.link.errors import LinkDown, LinkError, RemoteError
from vscsi.link.frames import (
    MAX_DATA,
    MAX_PAYLOAD,
    MIN_VERSION,
    VERSION,
    ControlResult,
    ExtentResult,
    Frame,
    FrameError,
    FrameType,
    SizeResult,
    Status,
    build_header,
    build_payload,
    encode,
    parse_result,
    write_head,
)
from vscsi.link.stream import TlsStream
from vscsi.link.tls import Refused
from vscsi.store.base import Extent, NotReadyError, VolumeError, WriteProtectedError

log = logging.getLogger(__name__)

REQUESTS = frozenset({
    FrameType.READ, FrameType.WRITE, FrameType.UNMAP, FrameType.FLUSH, FrameType.EXTENT,
    FrameType.SIZE, FrameType.HEARTBEAT, FrameType.CONTROL,
})  # fmt: skip
MAX_ERROR = 1024  # characters of an error text sent back
BACKOFF = (0.1, 5.0)  # seconds between connection attempts: first, then doubling up to this
APPLY_WORKERS = 16  # WRITEs of one connection that wait for their device, applied at once


# -- both sides -------------------------------------------------------------------------------


def hello(link: LinkConfig) -> bytes:
    return encode(
        FrameType.HELLO, 0,
        name=link.name, serial=link.serial, min_version=MIN_VERSION, max_version=VERSION,
    )  # fmt: skip


def check_hello(frame: Frame, remote: RemoteConfig) -> None:
    """The peer's first frame: a HELLO with the serial of its certificate, in a version range
    this array speaks."""
    if frame.type is not FrameType.HELLO or frame.seq != 0:
        raise Refused(f"first frame is {frame.type.name} #{frame.seq}, not HELLO #0")
    b = frame.body
    if b.serial != remote.serial:
        raise Refused(f"HELLO says serial {b.serial}, its certificate {remote.serial}")
    if b.max_version < MIN_VERSION or b.min_version > VERSION:
        raise Refused(
            f"speaks protocol versions {b.min_version}-{b.max_version}, "
            f"this array {MIN_VERSION}-{VERSION}"
        )


def reason(e: BaseException) -> str:
    """One line saying why a connection failed or ended."""
    if isinstance(e, EOFError):
        return "connection closed by the peer"
    if isinstance(e, ConnectionResetError):
        return "connection reset by the peer"
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: {e.reason} ({e.verify_message})"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _start_thread(name: str, netns: str | None, body: Callable[[], None]) -> threading.Thread:
    """A daemon thread running `body` in network namespace `netns` (when given), so every
    socket it opens is there; OSError, once it has ended, when the namespace cannot be
    entered."""
    entered: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run() -> None:
        if netns is not None:
            try:
                link_netns.enter(netns)
            except OSError as e:
                entered.set_exception(OSError(e.errno, f"network namespace {netns}: {e.strerror}"))
                return
        entered.set_result(None)
        body()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        entered.result()
    except OSError:
        thread.join()
        raise
    return thread


def _handshake(stream: TlsStream, timeout: float) -> None:
    stream.sock.settimeout(timeout)
    stream.handshake(timeout)
    _send_timeout(stream.sock, timeout)


def _send_timeout(sock: socket.socket, timeout: float) -> None:
    """Bound every later send by `timeout` in the kernel (SO_SNDTIMEO): a peer that takes
    nothing for that long is as dead as a silent one. The socket itself then blocks: with a
    timeout of its own, Python polls before every send and receive, a system call each, on
    every frame (the receiving thread polls before it reads anyway)."""
    seconds = int(timeout)
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", seconds, int((timeout - seconds) * 1e6)))  # fmt: skip


# -- the P side -------------------------------------------------------------------------------


class _Connection:
    """One live connection of a session: the requests in flight on it, by sequence number.

    Requests are sent by combining: a caller numbers its frame and queues it (in sequence
    order, under one lock), then waits its turn to send and sends everything queued by then;
    the callers queued behind it find theirs sent. Under load many frames leave in one TLS
    record and one `sendall` (one trip through the network stack, one wake-up of the S side's
    reader), without a sender thread, whose hand-off would cost more than the send itself."""

    def __init__(self, stream: TlsStream) -> None:
        self.stream = stream
        self.seq = 0
        self.taken = 0  # the last sequence number a sender has taken from `queued`
        self.pending: dict[int, concurrent.futures.Future[Container]] = {}
        self.queued: list[bytes | memoryview] = []  # frames numbered, not yet taken, in order
        self.dead: LinkError | None = None  # set once: no request is added after it
        self.lock = threading.Lock()  # guards seq, taken, pending, queued and dead
        self.sending = threading.Lock()  # held by the one caller sending what it took
        self.last_rx = time.monotonic()

    def request(
        self,
        ftype: FrameType,
        payload: Sequence[bytes | memoryview],
        fut: concurrent.futures.Future[Container],
    ) -> None:
        """Number and queue one request, and see it sent (by this caller or one before it);
        its answer or the connection's end completes `fut`."""
        length = sum(len(part) for part in payload)
        with self.lock:
            if self.dead is not None:
                raise self.dead
            self.seq += 1
            mine = self.seq
            self.pending[mine] = fut
            self.queued += (build_header(ftype, mine, length), *payload)
        with self.sending:
            with self.lock:
                if self.taken >= mine:
                    return  # a caller before this one sent it
                frames, self.queued, self.taken = self.queued, [], self.seq
            if frames:  # none when the connection failed them meanwhile
                self._send(frames)

    def heartbeat(self) -> None:
        """A HEARTBEAT, unless frames are being sent or queued (then bytes are flowing
        anyway): the receiving thread that sends it must never wait on a sender (see
        `TlsStream.abort`), nor send a caller's frames."""
        if not self.sending.acquire(blocking=False):
            return
        try:
            with self.lock:
                if self.dead is not None or self.queued:
                    return  # their callers wait for `sending`: they send them
                self.seq += 1
                self.taken = self.seq
                self.pending[self.seq] = concurrent.futures.Future()
                frame = build_header(FrameType.HEARTBEAT, self.seq, 0)
            self._send([frame])
        finally:
            self.sending.release()

    def _send(self, frames: list[bytes | memoryview]) -> None:
        try:
            self.stream.send(*frames)
        except (OSError, ssl.SSLError):
            self.stream.abort()  # a frame cut short: the receiver fails everything in flight

    def answered(self, frame: Frame) -> None:
        if frame.type is not FrameType.RESPONSE:
            raise FrameError(f"unexpected {frame.type.name} from the S side")
        with self.lock:
            fut = self.pending.pop(frame.body.answers, None)
        if fut is None:
            raise FrameError(f"RESPONSE to #{frame.body.answers}, not in flight")
        fut.set_result(frame.body)

    def fail(self, error: LinkError) -> None:
        with self.lock:
            self.dead = error
            pending, self.pending = self.pending, {}
            self.queued = []
        for fut in pending.values():
            fut.set_exception(error)


class LinkSession:
    """The P side's link to one peer array: one TLS connection, kept up (reconnecting with
    back-off), requests pipelined on it. Every method is thread safe, blocks until its answer,
    and raises `LinkError` when the request did not complete."""

    def __init__(
        self, link: LinkConfig, remote: RemoteConfig, backoff: tuple[float, float] = BACKOFF
    ) -> None:
        self.link, self.remote = link, remote
        self.backoff = backoff
        self._ctx = tls.context(link, [remote], server=False)
        self._conn: _Connection | None = None
        self._up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # None before start() and after close()
        self._lock = threading.Lock()  # guards _conn, _sock and _thread
        self._sock: socket.socket | None = None  # being connected: close() interrupts it

    @property
    def name(self) -> str:
        return self.remote.name

    def start(self) -> None:
        self._thread = _start_thread(f"link-{self.name}", self.link.netns, self._keep)

    def close(self) -> None:
        """Drop the connection; requests in flight and later ones raise LinkDown."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
            if self._sock is not None:
                _interrupt(self._sock)
            if self._conn is not None:
                self._conn.stream.abort()
        if thread is not None:
            thread.join()

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._up.wait(timeout)

    # -- requests ------------------------------------------------------------------------------

    def read(self, volume: str, offset: int, length: int) -> bytes:
        return bytes(self._call(FrameType.READ, volume=volume, offset=offset, length=length))

    def write(self, volume: str, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        """Returns once the peer applied it; with `fua`, once it is durable there. Reads and
        writes carry at most MAX_DATA bytes (`RemoteReplica` splits larger ones)."""
        if len(data) > MAX_DATA:
            raise ValueError(f"WRITE of {len(data)} bytes: split it (at most {MAX_DATA})")
        self._send(FrameType.WRITE, write_head(volume, offset, fua), data)

    def unmap(self, volume: str, offset: int, length: int) -> None:
        self._call(FrameType.UNMAP, volume=volume, offset=offset, length=length)

    def flush(self, volume: str) -> None:
        self._call(FrameType.FLUSH, volume=volume)

    def extent(self, volume: str, offset: int) -> Extent:
        r = parse_result(ExtentResult, self._call(FrameType.EXTENT, volume=volume, offset=offset))
        return Extent(r.offset, r.length, r.mapped)

    def size(self, volume: str) -> int:
        return int(parse_result(SizeResult, self._call(FrameType.SIZE, volume=volume)).size)

    def control(self, body: dict[str, Any]) -> dict[str, Any]:
        """A message for the peer's pair layer, ordered with the writes sent before it."""
        result: dict[str, Any] = parse_result(
            ControlResult, self._call(FrameType.CONTROL, body=body)
        )
        return result

    def _call(self, ftype: FrameType, **fields: Any) -> bytes:
        """Send one request and wait for its RESPONSE; the data of a successful one."""
        payload = build_payload(ftype, **fields)
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"{ftype.name} of {len(payload)} bytes: split it (at most {MAX_DATA})")
        return self._send(ftype, payload)

    def _send(self, ftype: FrameType, *payload: bytes | memoryview) -> bytes:
        """`_call` with the payload in parts, sent one after the other."""
        fut: concurrent.futures.Future[Container] = concurrent.futures.Future()
        with self._lock:
            conn, closed = self._conn, self._thread is None
        if closed:
            raise LinkDown(f"link to {self.name} is closed")
        if conn is None:
            raise LinkDown(f"link to {self.name} is down")
        conn.request(ftype, payload, fut)
        body = fut.result()
        if body.status is not Status.OK:
            raise RemoteError(body.status, f"array {self.name}: {body.error}")
        data: bytes = body.data
        return data

    # -- the connection ------------------------------------------------------------------------

    def _keep(self) -> None:
        """Connect, serve until the connection dies, fail what was in flight, reconnect."""
        delay = self.backoff[0]
        last = ""
        where = f"link to {self.name} ({self.remote.host}:{self.remote.port})"
        while not self._stop.is_set():
            try:
                stream = self._connect()
            except (OSError, EOFError, FrameError, Refused, ssl.SSLError) as e:
                if self._stop.is_set():
                    return
                if reason(e) != last:  # one line per new reason, not one per attempt
                    last = reason(e)
                    log.warning("%s: cannot connect: %s", where, last)
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            delay, last = self.backoff[0], ""
            conn = _Connection(stream)
            with self._lock:
                if self._stop.is_set():
                    stream.abort()
                    stream.sock.close()
                    return
                self._conn = conn
            log.info("%s up", where)
            self._up.set()
            try:
                why = self._serve(conn)
            finally:
                self._up.clear()
                with self._lock:
                    self._conn = None
                conn.fail(LinkDown(f"link to {self.name} lost"))
                stream.abort()
                stream.sock.close()
            log.warning("%s down: %s", where, why)

    def _connect(self) -> TlsStream:
        sock = socket.socket(socket.AF_INET6 if ":" in self.remote.host else socket.AF_INET)
        with self._lock:
            if self._stop.is_set():
                sock.close()
                raise OSError(0, "closed")
            self._sock = sock
        try:
            sock.settimeout(self.link.timeout)
            _no_delay(sock)
            sock.connect((self.remote.host, self.remote.port))
            stream = TlsStream(sock, self._ctx, server_side=False)
            _handshake(stream, self.link.timeout)
            tls.authenticate(stream.tls, [self.remote])
            stream.send(hello(self.link))
            check_hello(stream.read_frame(self.link.timeout), self.remote)
        except BaseException:
            sock.close()
            raise
        finally:
            with self._lock:
                self._sock = None
        return stream

    def _serve(self, conn: _Connection) -> str:
        """Receive answers until the connection ends: why it did. Heartbeats keep frames
        coming from a live peer; none for `timeout`: it is dead. Only a look at the socket
        made after the deadline says so: this thread may have been held up (a loaded host,
        an emulated CPU) while the answers came in."""
        timeout = self.link.timeout
        stream = conn.stream
        beat = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now - beat >= timeout / 4:
                    beat = now
                    conn.heartbeat()
                late = now - conn.last_rx > timeout
                wait = min(beat + timeout / 4, conn.last_rx + timeout) - now
                if stream.receive(wait):
                    conn.last_rx = time.monotonic()
                    while (frame := stream.next_frame()) is not None:
                        conn.answered(frame)
                elif late:
                    return f"no answer for {timeout:g}s"
            return "closed"
        except FrameError as e:
            return f"dropped: {e}"
        except LinkError as e:
            return str(e)
        except (OSError, EOFError, ssl.SSLError) as e:
            return reason(e)


def _no_delay(sock: socket.socket) -> None:
    """Every frame goes out at once: with Nagle's algorithm a small answer waits for the
    peer's delayed ACK of the one before (tens of milliseconds per request)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _interrupt(sock: socket.socket) -> None:
    """Wake the thread blocked on `sock` (connecting, accepting or receiving) with an error;
    that thread closes it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# -- the S side -------------------------------------------------------------------------------


class Target(Protocol):
    """What the S side applies a peer's requests to: a `Replica` (the S-VOL's store or the
    wrapper the pair layer puts on it); `extent_at` is optional (without it every range is
    reported mapped, which makes a hole-skipping copy copy it)."""

    @property
    def size(self) -> int: ...

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None: ...

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def unmap(self, offset: int, length: int) -> None: ...


Route = Callable[[RemoteConfig, str], Target | None]  # (peer, volume name) -> target or None
ControlHandler = Callable[[RemoteConfig, dict[str, Any]], dict[str, Any]]
Answer = tuple[Status, str, bytes | bytearray]


class _BadRequest(Exception):
    """A request no volume could serve (beyond its end): BAD_REQUEST."""


class _Peer:
    """A connection the server holds: its thread, its stream once TLS is up, and (once
    authenticated) which remote it is. `gone`: superseded or closed, apply nothing more."""

    def __init__(self, sock: socket.socket, who: str) -> None:
        self.sock = sock
        self.who = who
        self.thread: threading.Thread | None = None
        self.remote: RemoteConfig | None = None
        self.gone = False

    def drop(self) -> None:
        self.gone = True
        _interrupt(self.sock)


class LinkServer:
    """Accepts the configured peers on `link.listen` and applies each connection's requests
    one at a time, in sequence order, answering each once it is done (so a WRITE with FUA is
    durable on the target before its RESPONSE, and a FLUSH flushes the target).

    `route(peer, volume)` names the local target of a request, or None (the peer gets
    NO_VOLUME); `control(peer, body)` answers CONTROL messages (without it they are refused).
    """

    def __init__(
        self,
        link: LinkConfig,
        remotes: Sequence[RemoteConfig],
        route: Route,
        control: ControlHandler | None = None,
    ) -> None:
        if link.listen is None:
            raise ValueError("daemon.link_listen is not set")
        self.link = link
        self.remotes = list(remotes)
        self.route = route
        self.on_control = control
        self._ctx = tls.context(link, self.remotes, server=True)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._peers: list[_Peer] = []
        self._lock = threading.Lock()  # guards _peers
        self._closing = False

    def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        bound: concurrent.futures.Future[socket.socket] = concurrent.futures.Future()

        def listen() -> None:
            assert self.link.listen is not None
            try:
                sock = socket.create_server(self.link.listen, backlog=16)
            except OSError as e:
                bound.set_exception(e)
                return
            bound.set_result(sock)
            self._accept(sock)

        self._thread = _start_thread("link-server", self.link.netns, listen)
        try:
            self._listener = bound.result()
        except OSError:
            self._thread.join()
            self._thread = None
            raise

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port chosen, when the config said 0)."""
        assert self._listener is not None
        host, port = self._listener.getsockname()[:2]
        return host, port

    def close(self) -> None:
        """Stop accepting, drop every connection, and wait for requests being applied."""
        if self._thread is None or self._listener is None:
            return
        with self._lock:
            self._closing = True
            peers = list(self._peers)
        _interrupt(self._listener)  # wakes the accepting thread
        self._thread.join()
        self._listener.close()
        for peer in peers:
            peer.drop()
        for peer in peers:
            if peer.thread is not None:
                peer.thread.join()
        self._thread = self._listener = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except OSError:
                return  # closed
            _no_delay(sock)
            peer = _Peer(sock, f"{addr[0]}:{addr[1]}")
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                self._peers.append(peer)
                peer.thread = threading.Thread(
                    target=self._connection, args=(peer,), name=f"link-from-{peer.who}",
                    daemon=True,
                )  # fmt: skip
                peer.thread.start()

    def _connection(self, peer: _Peer) -> None:
        try:
            stream, remote = self._admit(peer)
            if stream is not None and remote is not None:
                log.info("link from %s (%s) up", remote.name, peer.who)
                log.warning("link from %s (%s) down: %s", remote.name, peer.who,
                            self._serve(peer, remote, stream))  # fmt: skip
        finally:
            peer.sock.close()
            with self._lock:
                self._peers.remove(peer)

    def _admit(self, peer: _Peer) -> tuple[TlsStream | None, RemoteConfig | None]:
        """TLS, the peer's certificate and HELLO, then this array's HELLO: the stream and
        who it is, or (None, None) when refused (logged)."""
        stream = TlsStream(peer.sock, self._ctx, server_side=True)
        try:
            _handshake(stream, self.link.timeout)
            remote = tls.authenticate(stream.tls, self.remotes)
            check_hello(stream.read_frame(self.link.timeout), remote)
            self._supersede(peer, remote)
            stream.send(hello(self.link))
        except (Refused, ssl.SSLError, FrameError) as e:
            log.warning("link: refused %s: %s", peer.who, reason(e))
        except (OSError, EOFError) as e:
            log.warning("link: handshake with %s failed: %s", peer.who, reason(e))
        else:
            return stream, remote
        return None, None

    def _supersede(self, peer: _Peer, remote: RemoteConfig) -> None:
        """A peer's new connection replaces its older ones: they are dropped, and the request
        one of them is applying ends, before the new one is answered. So nothing sent on an
        older connection (that the P side gave up on) is applied after anything on the new."""
        with self._lock:  # a later connection of the same peer drops this one, not the reverse
            peer.remote = remote
            old = [p for p in self._peers if p is not peer and p.remote == remote]
        for p in old:
            p.drop()
        for p in old:
            if p.thread is not None:
                p.thread.join()

    def _serve(self, peer: _Peer, remote: RemoteConfig, stream: TlsStream) -> str:
        """Read requests, apply them in order (WRITEs that wait for their device beside this
        thread, `_Beside`), answer those read together in one send; why the connection ended.
        A batch that takes long (a slow S-VOL under many pipelined writes) sends what it
        answered so far every quarter of the link timeout: the P side takes a peer that
        answers nothing for the timeout as dead, and this one is alive."""
        expected = 1
        timeout = self.link.timeout
        beside = _Beside(stream, f"link-apply-{remote.name}")
        try:
            while True:
                if not stream.receive(timeout):
                    return f"no frame for {timeout:g}s"
                answers: list[bytes] = []
                sent = time.monotonic()
                while (frame := stream.next_frame()) is not None:
                    if frame.seq != expected:
                        raise FrameError(f"sequence number {frame.seq}, expected {expected}")
                    if frame.type not in REQUESTS:
                        raise FrameError(f"unexpected {frame.type.name} from the P side")
                    expected += 1
                    if peer.gone:
                        return "superseded"
                    span, target = self._shape(remote, frame)
                    if blockers := beside.blocking(span):
                        if answers:  # sent before waiting: the P side's callers need not wait
                            stream.send(*answers)
                            answers, sent = [], time.monotonic()
                        concurrent.futures.wait(blockers)
                        if peer.gone:
                            return "superseded"
                    if span and target is not None and _waits(target, frame.body.fua):
                        beside.start(span, functools.partial(self._answer, remote, frame, target))
                        continue
                    answers.append(self._answer(remote, frame, target))
                    if time.monotonic() - sent >= timeout / 4:
                        stream.send(*answers)
                        answers, sent = [], time.monotonic()
                if answers:
                    stream.send(*answers)
        except FrameError as e:
            return f"dropped: {e}"
        except (OSError, EOFError, ssl.SSLError) as e:
            return "superseded" if peer.gone else reason(e)
        finally:
            beside.close()  # a superseding connection is served once these have ended

    def _shape(self, remote: RemoteConfig, frame: Frame) -> tuple[Span | None, Target | None]:
        """A WRITE's range (what it waits for among the writes in flight; None for any other
        request: it waits for all of them) and its target (None when it has none, or when
        routing refuses it: `_apply` answers that)."""
        if frame.type is not FrameType.WRITE:
            return None, None
        b = frame.body
        try:
            target = self.route(remote, b.volume)
        except Exception:  # refused (a state, a bug): answered in turn by `_apply`
            target = None
        return (b.volume, b.offset, b.offset + len(b.data)), target

    def _answer(self, remote: RemoteConfig, frame: Frame, target: Target | None = None) -> bytes:
        """Apply one request (to `target` when routed already), and the RESPONSE to it."""
        if frame.type is FrameType.HEARTBEAT:
            status, error, data = Status.OK, "", b""
        else:
            status, error, data = self._apply(remote, frame, target)
        return encode(
            FrameType.RESPONSE, frame.seq,
            answers=frame.seq, status=status, error=error[:MAX_ERROR], data=data,
        )  # fmt: skip

    def _apply(self, remote: RemoteConfig, frame: Frame, target: Target | None) -> Answer:
        b = frame.body
        try:
            if frame.type is FrameType.CONTROL:
                if self.on_control is None:
                    return Status.BAD_REQUEST, "this array takes no CONTROL messages", b""
                return Status.OK, "", ControlResult.build(self.on_control(remote, b.body))
            if target is None:
                target = self.route(remote, b.volume)
            if target is None:
                return Status.NO_VOLUME, f"no volume {b.volume!r} for array {remote.name}", b""
            return Status.OK, "", _apply_to(target, frame)
        except _BadRequest as e:
            return Status.BAD_REQUEST, str(e), b""
        except NotReadyError as e:
            return Status.NOT_READY, str(e), b""
        except WriteProtectedError as e:
            return Status.WRITE_PROTECTED, str(e), b""
        except (VolumeError, OSError) as e:
            return Status.FAILED, str(e), b""
        except Exception as e:  # a bug below must not take the link down with it
            log.exception("link: %s from %s failed", frame.type.name, remote.name)
            return Status.FAILED, f"{type(e).__name__}: {e}", b""


def _waits(target: Target, fua: bool) -> bool:
    """Whether a WRITE waits for the target's device: FUA, or a target without a write cache
    (one that says nothing of it has one)."""
    return fua or not getattr(target, "write_cache", True)


Span = tuple[str, int, int]  # a WRITE's volume, first byte and end


class _Beside:
    """The WRITEs of one connection that wait for their device (`_waits`), applied on threads
    beside the connection's reading thread, each answered as it ends. Applied one at a time,
    every synchronous write of a remote pair would wait for the ones before it on the S-VOL's
    device: the pair would run at queue depth 1 whatever the host's.

    The outcome is that of applying the requests in sequence order. Writes in flight together
    were all unanswered, so no host had been told of one when another was sent. A WRITE that
    overlaps one in flight waits for it (the P side's region locks keep such writes apart
    anyway); every request other than a WRITE waits for all of them: a FLUSH flushes them, a
    CONTROL (a split, a takeover) comes after them, a READ sees them, and a HEARTBEAT is
    answered only once they ended, so an S-VOL that stops making progress still reads as a dead
    peer on the P side. Only the connection's reading thread calls these methods."""

    def __init__(self, stream: TlsStream, name: str) -> None:
        self._stream = stream
        self._pool = concurrent.futures.ThreadPoolExecutor(APPLY_WORKERS, name)
        self._running: dict[concurrent.futures.Future[None], Span] = {}

    def blocking(self, span: Span | None) -> list[concurrent.futures.Future[None]]:
        """The writes in flight a request on `span` waits for (None: every one)."""
        self._running = {f: s for f, s in self._running.items() if not f.done()}
        if span is None:
            return list(self._running)
        volume, start, end = span
        return [f for f, (v, s, e) in self._running.items()
                if v == volume and s < end and start < e]  # fmt: skip

    def start(self, span: Span, answer: Callable[[], bytes]) -> None:
        self._running[self._pool.submit(self._run, answer)] = span

    def _run(self, answer: Callable[[], bytes]) -> None:
        try:
            self._stream.send(answer())
        except (OSError, ssl.SSLError):
            self._stream.abort()  # a frame cut short: the reading thread ends the connection
        except Exception:  # a bug: unanswered, the request would hold its P side caller
            log.exception("a write applied beside the link's reading thread failed")
            self._stream.abort()

    def close(self) -> None:
        """Wait for every write in flight."""
        self._pool.shutdown(wait=True)


def _apply_to(target: Target, frame: Frame) -> bytes | bytearray:
    """The data of the RESPONSE (empty for most requests)."""
    b = frame.body
    match frame.type:
        case FrameType.READ:
            _check_range(target, b.offset, b.length)
            buf = bytearray(b.length)
            target.readinto(b.offset, [memoryview(buf)])
            return buf
        case FrameType.WRITE:
            _check_range(target, b.offset, len(b.data))
            target.write(b.offset, [memoryview(b.data)], b.fua)
        case FrameType.UNMAP:
            _check_range(target, b.offset, b.length)
            target.unmap(b.offset, b.length)
        case FrameType.FLUSH:
            target.flush()
        case FrameType.EXTENT:
            _check_range(target, b.offset, 1)
            extent_at = getattr(target, "extent_at", None)
            e = extent_at(b.offset) if extent_at else Extent(b.offset, target.size - b.offset, True)
            return ExtentResult.build({"offset": e.offset, "length": e.length, "mapped": e.mapped})
        case FrameType.SIZE:
            return SizeResult.build({"size": target.size})
    return b""


def _check_range(target: Target, offset: int, length: int) -> None:
    if offset + length > target.size:
        raise _BadRequest(f"{offset}+{length} is beyond the end ({target.size} bytes)")
