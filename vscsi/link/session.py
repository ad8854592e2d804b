"""The link sessions: `LinkSession`, the P side's connection to one peer array, and
`LinkServer`, the S side that accepts peers and applies their requests to local volumes.

Network I/O runs on an asyncio loop in a thread of each object's own (one TLS connection must
not be read and written from two threads at once); callers in other threads block only on the
future of their own request, so many requests are in flight at once on one connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from construct import Container

from vscsi.config import LinkConfig, RemoteConfig
from vscsi.link import netns as link_netns
from vscsi.link import tls
from vscsi.link.frames import (
    HEADER_SIZE,
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
    parse_header,
    parse_payload,
    parse_result,
)
from vscsi.link.tls import Refused
from vscsi.store.base import Extent, NotReadyError, VolumeError, WriteProtectedError

log = logging.getLogger(__name__)

REQUESTS = frozenset({
    FrameType.READ, FrameType.WRITE, FrameType.UNMAP, FrameType.FLUSH, FrameType.EXTENT,
    FrameType.SIZE, FrameType.HEARTBEAT, FrameType.CONTROL,
})  # fmt: skip
MAX_ERROR = 1024  # characters of an error text sent back
BACKOFF = (0.1, 5.0)  # seconds between connection attempts: first, then doubling up to this


class LinkError(VolumeError):
    """A request to a peer array that did not complete: the pair layer applies its fence."""


class LinkDown(LinkError):
    """No working connection to the peer: not yet up, refused, lost, or the peer went silent.
    A request in flight when the link went down may or may not have been applied."""


class RemoteError(LinkError):
    """The peer answered, and the request failed there (`status` says how)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- both sides -------------------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    header = parse_header(await reader.readexactly(HEADER_SIZE))
    payload = await reader.readexactly(header.length)
    return Frame(header.type, header.seq, parse_payload(header.type, payload))


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
    if isinstance(e, asyncio.IncompleteReadError):
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


class _LoopThread:
    """An asyncio loop running in a daemon thread; in network namespace `netns`, when given,
    so every socket the loop opens is there. OSError when that namespace cannot be entered."""

    def __init__(self, name: str, netns: str | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        entered: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.thread = threading.Thread(
            target=self._run, args=(netns, entered), name=name, daemon=True
        )
        self.thread.start()
        try:
            entered.result()
        except OSError:
            self.thread.join()
            self.loop.close()
            raise

    def _run(self, netns: str | None, entered: concurrent.futures.Future[None]) -> None:
        if netns is not None:
            try:
                link_netns.enter(netns)
            except OSError as e:
                entered.set_exception(OSError(e.errno, f"network namespace {netns}: {e.strerror}"))
                return
        entered.set_result(None)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


# -- the P side -------------------------------------------------------------------------------


class _Connection:
    """One live connection of a session: the requests in flight on it, by sequence number."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.seq = 0
        self.pending: dict[int, concurrent.futures.Future[Container]] = {}
        self.last_rx = asyncio.get_running_loop().time()

    def fail(self, error: LinkError) -> None:
        for fut in self.pending.values():
            fut.set_exception(error)
        self.pending.clear()


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
        self._conn: _Connection | None = None  # touched only on the loop
        self._up = threading.Event()
        self._thread: _LoopThread | None = None  # None before start() and after close()
        self._lock = threading.Lock()  # no request is queued on a loop being stopped
        self._keeper: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.remote.name

    def start(self) -> None:
        self._thread = _LoopThread(f"link-{self.name}", self.link.netns)
        self._keeper = self._thread.run(self._spawn())

    async def _spawn(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._keep())

    def close(self) -> None:
        """Drop the connection; requests in flight and later ones raise LinkDown."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.run(self._stop())  # after the requests queued before: they fail, not hang
            thread.stop()

    async def _stop(self) -> None:
        assert self._keeper is not None
        self._keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._keeper

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._up.wait(timeout)

    # -- requests ------------------------------------------------------------------------------

    def read(self, volume: str, offset: int, length: int) -> bytes:
        return bytes(self._call(FrameType.READ, volume=volume, offset=offset, length=length))

    def write(self, volume: str, offset: int, data: bytes, fua: bool = False) -> None:
        """Returns once the peer applied it; with `fua`, once it is durable there. Reads and
        writes carry at most MAX_DATA bytes (`RemoteReplica` splits larger ones)."""
        self._call(FrameType.WRITE, volume=volume, offset=offset, fua=fua, data=data)

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
        fut: concurrent.futures.Future[Container] = concurrent.futures.Future()
        with self._lock:
            if self._thread is None:
                raise LinkDown(f"link to {self.name} is closed")
            self._thread.loop.call_soon_threadsafe(self._send, ftype, payload, fut)
        body = fut.result()
        if body.status is not Status.OK:
            raise RemoteError(body.status, f"array {self.name}: {body.error}")
        data: bytes = body.data
        return data

    def _send(
        self, ftype: FrameType, payload: bytes, fut: concurrent.futures.Future[Container]
    ) -> None:
        """On the loop: number the request and queue it, so sequence order is sending order."""
        conn = self._conn
        if conn is None:
            fut.set_exception(LinkDown(f"link to {self.name} is down"))
            return
        conn.seq += 1
        conn.pending[conn.seq] = fut
        conn.writer.write(build_header(ftype, conn.seq, len(payload)) + payload)

    # -- the connection ------------------------------------------------------------------------

    async def _keep(self) -> None:
        """Connect, serve until the connection dies, fail what was in flight, reconnect."""
        delay = self.backoff[0]
        last = ""
        where = f"link to {self.name} ({self.remote.host}:{self.remote.port})"
        while True:
            try:
                async with asyncio.timeout(self.link.timeout):  # not wait_for: on 3.11 it
                    conn = await self._connect()  # can swallow close()'s cancel (gh-86296)
            except (OSError, EOFError, TimeoutError, FrameError, Refused) as e:
                if reason(e) != last:  # one line per new reason, not one per attempt
                    last = reason(e)
                    log.warning("%s: cannot connect: %s", where, last)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            delay, last = self.backoff[0], ""
            log.info("%s up", where)
            self._conn = conn
            self._up.set()
            try:
                why = await self._serve(conn)
            finally:
                self._up.clear()
                self._conn = None
                conn.fail(LinkDown(f"link to {self.name} lost"))
                _reset(conn.writer)
            log.warning("%s down: %s", where, why)

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(
            self.remote.host, self.remote.port, ssl=self._ctx
        )
        try:
            tls.authenticate(writer.get_extra_info("ssl_object"), [self.remote])
            writer.write(hello(self.link))
            check_hello(await read_frame(reader), self.remote)
        except BaseException:
            writer.close()
            raise
        return _Connection(reader, writer)

    async def _serve(self, conn: _Connection) -> str:
        """Until the connection ends: why it did."""
        tasks = [asyncio.create_task(self._receive(conn)), asyncio.create_task(self._watch(conn))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()
        finally:
            for t in tasks:
                t.cancel()

    async def _receive(self, conn: _Connection) -> str:
        try:
            while True:
                frame = await read_frame(conn.reader)
                conn.last_rx = asyncio.get_running_loop().time()
                if frame.type is not FrameType.RESPONSE:
                    raise FrameError(f"unexpected {frame.type.name} from the S side")
                fut = conn.pending.pop(frame.body.answers, None)
                if fut is None:
                    raise FrameError(f"RESPONSE to #{frame.body.answers}, not in flight")
                fut.set_result(frame.body)
        except FrameError as e:
            return f"dropped: {e}"
        except (OSError, EOFError) as e:
            return reason(e)

    async def _watch(self, conn: _Connection) -> str:
        """Heartbeats keep frames coming from a live peer; none for `timeout`: it is dead."""
        loop = asyncio.get_running_loop()
        timeout = self.link.timeout
        while True:
            await asyncio.sleep(timeout / 4)
            if loop.time() - conn.last_rx > timeout:
                return f"no answer for {timeout:g}s"
            self._send(FrameType.HEARTBEAT, b"", concurrent.futures.Future())


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset: requests the kernel still holds for the peer are discarded, never
    delivered late (they were failed to their callers)."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:  # None or closed: nothing is held any more
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


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
        self._thread: _LoopThread | None = None
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], _Peer] = {}

    def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        self._thread = _LoopThread("link-server", self.link.netns)
        try:
            self._thread.run(self._listen())
        except OSError:
            self._thread.stop()
            self._thread = None
            raise

    async def _listen(self) -> None:
        assert self.link.listen is not None
        host, port = self.link.listen
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Accepted(self._accepted), host, port)

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port chosen, when the config said 0)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def close(self) -> None:
        """Stop accepting, drop every connection, and wait for requests being applied."""
        if self._thread is None:
            return
        self._thread.run(self._stop())
        self._thread.stop()
        self._thread = None

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for peer in self._conns.values():
            peer.transport.abort()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()

    def _accepted(self, transport: asyncio.Transport) -> None:
        task = asyncio.get_running_loop().create_task(self._accept(transport))
        self._conns[task] = _Peer(transport)

    async def _accept(self, transport: asyncio.Transport) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = self._conns[task]
        host, port = transport.get_extra_info("peername")[:2]
        who = f"{host}:{port}"
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.link.timeout):
                reader, writer = await self._tls(transport)
            remote = tls.authenticate(writer.get_extra_info("ssl_object"), self.remotes)
            async with asyncio.timeout(self.link.timeout):
                check_hello(await read_frame(reader), remote)
            peer.remote = remote
            await self._supersede(task, remote)
            writer.write(hello(self.link))
        except (Refused, ssl.SSLError, FrameError) as e:
            log.warning("link: refused %s: %s", who, reason(e))
        except (OSError, EOFError, TimeoutError) as e:
            log.warning("link: handshake with %s failed: %s", who, reason(e))
        else:
            log.info("link from %s (%s) up", remote.name, who)
            log.warning("link from %s (%s) down: %s", remote.name, who,
                        await self._serve(remote, reader, writer))  # fmt: skip
        finally:
            (writer or transport).close()
            del self._conns[task]

    async def _tls(
        self, transport: asyncio.Transport
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The TLS handshake on a new connection, then streams over it."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        secure = await loop.start_tls(transport, protocol, self._ctx, server_side=True)
        assert secure is not None
        protocol.connection_made(secure)
        return reader, asyncio.StreamWriter(secure, protocol, reader, loop)

    async def _supersede(self, task: asyncio.Task[None], remote: RemoteConfig) -> None:
        """A peer's new connection replaces its older ones: they are dropped, and the request
        one of them is applying ends, before the new one is answered. So nothing sent on an
        older connection (that the P side gave up on) is applied after anything on the new."""
        old = [t for t, p in self._conns.items() if t is not task and p.remote == remote]
        for t in old:
            self._conns[t].transport.abort()
        await asyncio.gather(*old, return_exceptions=True)

    async def _serve(
        self, remote: RemoteConfig, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> str:
        """Read requests while the connection's applier applies them; why it ended."""
        applier = _Applier(lambda frame: self._answer(remote, frame), writer, remote.name)
        expected = 1
        try:
            while True:
                async with asyncio.timeout(self.link.timeout):
                    frame = await read_frame(reader)
                if frame.seq != expected:
                    raise FrameError(f"sequence number {frame.seq}, expected {expected}")
                if frame.type not in REQUESTS:
                    raise FrameError(f"unexpected {frame.type.name} from the P side")
                expected += 1
                applier.queue.put(frame)
        except TimeoutError:
            return f"no frame for {self.link.timeout:g}s"
        except FrameError as e:
            return f"dropped: {e}"
        except (OSError, EOFError) as e:
            return reason(e)
        finally:
            await applier.stop()

    def _answer(self, remote: RemoteConfig, frame: Frame) -> bytes:
        """In the applier's thread: apply one request, and the RESPONSE to it."""
        if frame.type is FrameType.HEARTBEAT:
            status, error, data = Status.OK, "", b""
        else:
            status, error, data = self._apply(remote, frame)
        return encode(
            FrameType.RESPONSE, frame.seq,
            answers=frame.seq, status=status, error=error[:MAX_ERROR], data=data,
        )  # fmt: skip

    def _apply(self, remote: RemoteConfig, frame: Frame) -> Answer:
        b = frame.body
        try:
            if frame.type is FrameType.CONTROL:
                if self.on_control is None:
                    return Status.BAD_REQUEST, "this array takes no CONTROL messages", b""
                return Status.OK, "", ControlResult.build(self.on_control(remote, b.body))
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


class _Applier:
    """Applies one connection's requests in a thread of its own, in the order they came, and
    hands the answers to the loop, several at once when requests queue up (a thread hop per
    request would cost more than most requests). Requests still queued once the connection is
    gone are dropped, not applied."""

    def __init__(
        self, answer: Callable[[Frame], bytes], writer: asyncio.StreamWriter, name: str
    ) -> None:
        self.answer = answer
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.queue: queue.SimpleQueue[Frame | None] = queue.SimpleQueue()
        self.gone = False
        self.done = self.loop.create_future()
        threading.Thread(target=self._run, name=f"link-apply-{name}", daemon=True).start()

    async def stop(self) -> None:
        """Once the request being applied (if any) is done."""
        self.gone = True
        self.queue.put(None)
        await self.done

    def _run(self) -> None:
        answers: list[bytes] = []
        try:
            while (frame := self._next(answers)) is not None:
                if not self.gone:
                    answers.append(self.answer(frame))
        finally:
            self.loop.call_soon_threadsafe(self.done.set_result, None)

    def _next(self, answers: list[bytes]) -> Frame | None:
        """The next request; before waiting for one, send the answers made so far."""
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            if answers:
                self.loop.call_soon_threadsafe(self.writer.write, b"".join(answers))
                answers.clear()
            return self.queue.get()


class _Peer:
    """A connection the server holds, and (once authenticated) which remote it is."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.remote: RemoteConfig | None = None


class _Accepted(asyncio.Protocol):
    """Holds a new connection unread until the TLS handshake takes it over (bytes read before
    would be lost to the handshake, which then stalls)."""

    def __init__(self, accepted: Callable[[asyncio.Transport], None]) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.accepted(transport)


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
