"""The link over real loopback TCP and TLS: two arrays made with `vscsi link keys`, the P side's
`LinkSession` and `RemoteReplica`, the S side's `LinkServer` over in-memory volumes."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.unit.memvolume import MemVolume
from vscsi.cli import main
from vscsi.config import LinkConfig, RemoteConfig, parse
from vscsi.link import netns, replica, tls
from vscsi.link.frames import (
    HEADER_SIZE,
    Frame,
    FrameType,
    Status,
    encode,
    parse_header,
    parse_payload,
    write_head,
)
from vscsi.link.replica import RemoteReplica
from vscsi.link.session import (
    LinkDown,
    LinkError,
    LinkServer,
    LinkSession,
    RemoteError,
    _Connection,
)
from vscsi.store.base import VolumeError

A, B = ("siteA", 1001), ("siteB", 2002)  # the P side's array, the S side's
TIMEOUT = 0.6  # link_timeout in these tests: dead-peer detection within about 1.25x this
BACKOFF = (0.05, 0.2)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys for A and B, and for impostors C and D claiming A's and B's name and serial."""
    d = tmp_path_factory.mktemp("keys")
    for sub, (name, serial) in (("a", A), ("b", B), ("c", A), ("d", B)):
        r = CliRunner().invoke(
            main, ["link", "keys", "--dir", str(d / sub), "--name", name, "--serial", str(serial)]
        )
        assert r.exit_code == 0, r.output
    return d


def array(
    keys: Path, me: str, peer: str, peer_sub: str, port: int = 1
) -> tuple[LinkConfig, RemoteConfig]:
    """This array's link config and its one [[remote]], through the config parser."""
    own = {"a": A, "b": B, "c": A, "d": B}[me]
    other = B if own == A else A
    cfg = parse({
        "daemon": {
            "link_cert": str(keys / me / f"{own[0]}.crt"),
            "link_key": str(keys / me / f"{own[0]}.key"),
            "link_timeout": TIMEOUT,
        },
        "volume": [{"name": "v", "path": "/nonexistent/v.img"}],
        "remote": [{
            "name": other[0], "address": f"127.0.0.1:{port}", "serial": other[1],
            "peer_cert": str(keys / peer_sub / f"{peer}.crt"),
        }],
    })  # fmt: skip
    assert cfg.link is not None
    return dataclasses.replace(cfg.link, listen=("127.0.0.1", 0)), cfg.remotes[0]


class GatedVolume(MemVolume):
    """A MemVolume whose writes wait while `gate` is clear, and then take `delay` seconds;
    `inside` counts the writes under way."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.delay = 0.0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.inside = 0
        self._count = threading.Condition()

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        with self._count:
            self.inside += 1
            self._count.notify_all()
        try:
            self.entered.set()
            self.gate.wait()
            time.sleep(self.delay)
            super().write(offset, bufs, fua)
        finally:
            with self._count:
                self.inside -= 1

    def wait_inside(self, n: int) -> bool:
        with self._count:
            return self._count.wait_for(lambda: self.inside >= n, 5)


class Site:
    """The S side: a LinkServer offering volume "s0" (and "raw", without extent_at) to A."""

    def __init__(self, keys: Path, peer_sub: str = "a", port: int = 0) -> None:
        link, remote = array(keys, "b", A[0], peer_sub)
        self.link = dataclasses.replace(link, listen=("127.0.0.1", port))
        self.remote = remote
        self.volume = GatedVolume(size=1 << 20)
        self.controls: list[dict[str, Any]] = []
        self.server = self.make()

    def route(self, peer: RemoteConfig, name: str) -> Any:
        assert peer.serial == A[1]
        return {"s0": self.volume, "raw": NoExtents(self.volume)}.get(name)

    def control(self, peer: RemoteConfig, body: dict[str, Any]) -> dict[str, Any]:
        self.controls.append(body)
        return {"seen": body, "from": peer.name}

    def make(self, remotes: list[RemoteConfig] | None = None) -> LinkServer:
        server = LinkServer(self.link, remotes or [self.remote], self.route, self.control)
        server.start()
        return server

    @property
    def port(self) -> int:
        return self.server.address[1]


class NoExtents:
    """A target that cannot say what is mapped (no extent_at)."""

    def __init__(self, volume: MemVolume) -> None:
        self.v = volume
        self.size = volume.size
        self.readinto, self.write, self.flush, self.unmap = (
            volume.readinto, volume.write, volume.flush, volume.unmap,
        )  # fmt: skip


@pytest.fixture
def site(keys: Path) -> Iterator[Site]:
    s = Site(keys)
    yield s
    s.volume.gate.set()  # a failed test must not leave a write waiting (close waits for it)
    s.server.close()


def session_to(keys: Path, port: int, peer_sub: str = "b", me: str = "a") -> LinkSession:
    link, remote = array(keys, me, B[0], peer_sub, port)
    s = LinkSession(link, remote, backoff=BACKOFF)
    s.start()
    return s


@pytest.fixture
def session(keys: Path, site: Site) -> Iterator[LinkSession]:
    s = session_to(keys, site.port)
    assert s.wait_connected(5)
    yield s
    s.close()


# -- the Replica operations ------------------------------------------------------------------


def test_remote_replica_round_trips_every_operation(session: LinkSession, site: Site) -> None:
    r = RemoteReplica(session, "s0")
    assert r.size == 1 << 20
    r.write(4096, [memoryview(b"a" * 512), memoryview(b"b" * 512)])
    buf = bytearray(1024)
    r.readinto(4096, [memoryview(buf)[:100], memoryview(buf)[100:]])
    assert bytes(buf) == b"a" * 512 + b"b" * 512 == bytes(site.volume.data[4096:5120])
    assert r.extent_at(0).mapped is False and r.extent_at(0).length == 4096
    assert r.extent_at(4096) == site.volume.extent_at(4096)
    r.unmap(4096, 512)
    assert bytes(site.volume.data[4096:4608]) == bytes(512)
    assert session.control({"op": "suspend", "pair": "p1"}) == {
        "seen": {"op": "suspend", "pair": "p1"}, "from": A[0],
    }  # fmt: skip


def test_large_requests_are_split(
    session: LinkSession, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replica, "MAX_DATA", 1024)  # as if 1 KiB were the most a frame carries
    r = RemoteReplica(session, "s0")
    data = bytes(range(256)) * 12
    r.write(8192, [memoryview(data[:1000]), memoryview(data[1000:])], fua=True)
    assert site.volume.writes == [(8192, 1024, True), (9216, 1024, True), (10240, 1024, True)]
    bufs = [memoryview(bytearray(1500)), memoryview(bytearray(1572))]
    r.readinto(8192, bufs)
    assert b"".join(bytes(b) for b in bufs) == data


def test_fua_and_flush_reach_the_s_volume(session: LinkSession, site: Site) -> None:
    r = RemoteReplica(session, "s0")
    r.write(0, [memoryview(bytes(512))], fua=True)
    r.write(512, [memoryview(bytes(512))])
    assert site.volume.writes == [(0, 512, True), (512, 512, False)]
    r.flush()
    assert site.volume.flushes == 1


def test_a_write_is_answered_only_once_the_s_volume_has_it(
    session: LinkSession, site: Site
) -> None:
    site.volume.gate.clear()
    t = threading.Thread(target=RemoteReplica(session, "s0").write, args=(0, [b"x" * 512], True))
    t.start()
    assert site.volume.entered.wait(5)
    t.join(0.3)
    assert t.is_alive()  # the S volume has not finished the write: no answer yet
    site.volume.gate.set()
    t.join(5)
    assert not t.is_alive() and site.volume.writes == [(0, 512, True)]


def test_failures_on_the_s_side_are_answered_and_the_link_stays_up(
    session: LinkSession, site: Site
) -> None:
    with pytest.raises(RemoteError, match="no volume 'nope' for array siteA") as e:
        RemoteReplica(session, "nope").flush()
    assert e.value.status is Status.NO_VOLUME
    with pytest.raises(RemoteError, match="beyond the end") as e:
        session.read("s0", 1 << 20, 512)
    assert e.value.status is Status.BAD_REQUEST
    site.volume.bad_write.add(8192)
    with pytest.raises(RemoteError, match="write error at byte 8192") as e:
        session.write("s0", 8192, bytes(512))
    assert e.value.status is Status.FAILED
    assert isinstance(e.value, LinkError) and isinstance(e.value, VolumeError)
    assert session.connected and session.size("s0") == 1 << 20


def test_a_target_without_extents_reports_everything_mapped(session: LinkSession) -> None:
    assert RemoteReplica(session, "raw").extent_at(8192).mapped is True


def test_control_without_a_handler_is_refused(keys: Path, site: Site) -> None:
    site.server.close()
    server = LinkServer(site.link, [site.remote], site.route)
    server.start()
    s = session_to(keys, server.address[1])
    try:
        assert s.wait_connected(5)
        with pytest.raises(RemoteError, match="no CONTROL") as e:
            s.control({"op": "x"})
        assert e.value.status is Status.BAD_REQUEST
    finally:
        s.close()
        server.close()


# -- pipelining and order --------------------------------------------------------------------


def test_sixteen_requests_are_in_flight_at_once(keys: Path) -> None:
    """A fake S side that answers nothing until it holds 16 requests: a session that sent one
    request at a time would never get there."""
    link, remote = array(keys, "b", A[0], "a")
    ctx = tls.context(link, [remote], server=True)
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[Frame] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as s:
            recv_frame(s)
            s.sendall(hello_frame(*B))
            while len(held) < 16:
                f = recv_frame(s)
                if f.type is FrameType.WRITE:
                    held.append(f)
            for f in reversed(held):  # answered out of order: each caller gets its own answer
                s.sendall(ok(f.seq))

    threading.Thread(target=serve, daemon=True).start()
    s = session_to(keys, listener.getsockname()[1])
    try:
        assert s.wait_connected(5)
        done: list[int] = []

        def write(i: int) -> None:
            s.write("s0", i * 512, bytes(512))
            done.append(i)

        writers = [threading.Thread(target=write, args=(i,)) for i in range(16)]
        for t in writers:
            t.start()
        for t in writers:
            t.join(10)
        assert sorted(done) == list(range(16)) and len(held) == 16
    finally:
        s.close()
        listener.close()


def test_pipelined_writes_are_applied_in_sequence_order(keys: Path, site: Site) -> None:
    with raw_client(keys, site.port) as s:
        frames = [
            encode(FrameType.WRITE, seq, volume="s0", offset=(seq % 4) * 512, fua=False,
                   data=bytes([seq]) * 512)
            for seq in range(1, 33)
        ]  # fmt: skip
        s.sendall(b"".join(frames))  # all 32 sent before any answer is read
        answers = [recv_frame(s) for _ in range(32)]
    assert [a.body.answers for a in answers] == list(range(1, 33))
    assert all(a.body.status is Status.OK for a in answers)
    assert [w[0] for w in site.volume.writes] == [(seq % 4) * 512 for seq in range(1, 33)]
    assert [site.volume.data[i * 512] for i in range(4)] == [32, 29, 30, 31]  # the last ones


def test_a_slow_s_volume_under_pipelined_writes_keeps_the_link_up(keys: Path, site: Site) -> None:
    """Sixteen writers at once to an S-VOL that takes a sixth of the link timeout per write:
    the S side reads most of them in one batch, which takes longer than the timeout to apply.
    The P side must still hear from it within the timeout and keep the link."""
    site.volume.delay = TIMEOUT / 6
    s = session_to(keys, site.port)
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            s.write("s0", i * 512, bytes([i]) * 512)
        except LinkError as e:
            errors.append(e)

    try:
        assert s.wait_connected(5)
        for _ in range(2):
            writers = [threading.Thread(target=write, args=(i,)) for i in range(16)]
            for t in writers:
                t.start()
            for t in writers:
                t.join(10)
        assert not errors and s.connected
        assert [site.volume.data[i * 512] for i in range(16)] == list(range(16))
    finally:
        s.close()


@pytest.mark.parametrize("fua", [False, True])
def test_a_reconnecting_peer_supersedes_its_old_connection(
    keys: Path, site: Site, fua: bool
) -> None:
    """Nothing sent on a connection the P side gave up on is applied after the new one is up:
    the request being applied finishes first, the rest of the old connection is dropped. With
    FUA the first write is applied beside the reading thread, the second waits for it."""
    site.volume.gate.clear()
    old = raw_client(keys, site.port)
    old.sendall(
        encode(FrameType.WRITE, 1, volume="s0", offset=0, fua=fua, data=b"1" * 512)
        + encode(FrameType.WRITE, 2, volume="s0", offset=0, fua=fua, data=b"2" * 512)
    )
    assert site.volume.entered.wait(5)
    new = session_to(keys, site.port)
    try:
        assert not new.wait_connected(2 * TIMEOUT)  # waits for the write being applied
        site.volume.gate.set()
        assert new.wait_connected(5)
        new.write("s0", 512, b"3" * 512)
        assert site.volume.writes == [(0, 512, fua), (512, 512, False)]
        assert bytes(site.volume.data[:512]) == b"1" * 512
    finally:
        new.close()
        old.close()


def wfua(seq: int, offset: int, data: bytes, fua: bool = True) -> bytes:
    return encode(FrameType.WRITE, seq, volume="s0", offset=offset, fua=fua, data=data)


def quiet(s: ssl.SSLSocket, seconds: float) -> bool:
    """No answer arrives on `s` for `seconds`."""
    return not s.pending() and not select.select([s], [], [], seconds)[0]


@pytest.mark.parametrize(("fua", "write_cache"), [(True, True), (False, False)])
def test_writes_that_wait_for_the_device_are_applied_side_by_side(
    keys: Path, site: Site, fua: bool, write_cache: bool
) -> None:
    """Writes that wait for the S-VOL's device (FUA, or no write cache) are applied at once,
    each answered when it ends: one at a time, a remote pair's synchronous writes would run at
    queue depth 1 whatever the host's."""
    site.volume.write_cache = write_cache
    site.volume.gate.clear()
    with raw_client(keys, site.port) as s:
        s.sendall(b"".join(wfua(seq, seq * 4096, bytes([seq]) * 4096, fua) for seq in range(1, 5)))
        assert site.volume.wait_inside(4)
        assert quiet(s, 0.1)
        site.volume.gate.set()
        answers = [recv_frame(s) for _ in range(4)]
    assert sorted(a.body.answers for a in answers) == [1, 2, 3, 4]
    assert all(a.body.status is Status.OK for a in answers)
    assert [site.volume.data[seq * 4096] for seq in range(1, 5)] == [1, 2, 3, 4]


def test_an_overlapping_write_waits_for_the_one_in_flight(keys: Path, site: Site) -> None:
    site.volume.gate.clear()
    with raw_client(keys, site.port) as s:
        s.sendall(wfua(1, 0, b"1" * 4096) + wfua(2, 2048, b"2" * 4096))
        assert site.volume.wait_inside(1)
        assert quiet(s, 0.2) and site.volume.inside == 1  # the second waits for the first
        site.volume.gate.set()
        answers = [recv_frame(s) for _ in range(2)]
    assert all(a.body.status is Status.OK for a in answers)
    assert [w[0] for w in site.volume.writes] == [0, 2048]
    assert bytes(site.volume.data[:6144]) == b"1" * 2048 + b"2" * 4096


AFTER_WRITES = {
    "FLUSH": encode(FrameType.FLUSH, 2, volume="s0"),
    "CONTROL": encode(FrameType.CONTROL, 2, body={"op": "split"}),
    "READ": encode(FrameType.READ, 2, volume="s0", offset=0, length=4096),
    "HEARTBEAT": encode(FrameType.HEARTBEAT, 2),
    "UNMAP": encode(FrameType.UNMAP, 2, volume="s0", offset=8192, length=4096),
}


@pytest.mark.parametrize("kind", AFTER_WRITES)
def test_a_request_after_writes_in_flight_is_applied_once_they_ended(
    keys: Path, site: Site, kind: str
) -> None:
    """A FLUSH flushes the writes sent before it, a CONTROL (a split) comes after them, a READ
    sees them, and a HEARTBEAT is answered only once they ended (an S-VOL that makes no
    progress must still read as a dead peer)."""
    site.volume.gate.clear()
    site.volume.data[8192:12288] = b"u" * 4096
    with raw_client(keys, site.port) as s:
        s.sendall(wfua(1, 0, b"w" * 4096) + AFTER_WRITES[kind])
        assert site.volume.wait_inside(1)
        assert quiet(s, 0.2)
        assert (site.volume.flushes, site.controls, site.volume.data[8192]) == (0, [], ord("u"))
        site.volume.gate.set()
        answers = [recv_frame(s) for _ in range(2)]
    assert [a.body.answers for a in answers] == [1, 2]
    assert all(a.body.status is Status.OK for a in answers)
    if kind == "READ":
        assert answers[1].body.data == b"w" * 4096
    assert site.volume.flushes == (kind == "FLUSH") and len(site.controls) == (kind == "CONTROL")


# -- authentication --------------------------------------------------------------------------


def test_a_peer_with_an_unknown_certificate_is_refused(
    keys: Path, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="vscsi.link"):
        s = session_to(keys, site.port, me="c")  # C: A's name and serial, another key
        try:
            assert not s.wait_connected(0.5)
            with pytest.raises(LinkDown):
                s.write("s0", 0, b"x" * 512)
        finally:
            s.close()
    assert site.volume.writes == []
    assert any(
        r.message.startswith("link: refused 127.0.0.1:") and "certificate" in r.message.lower()
        for r in caplog.records
    ), caplog.text


def test_the_p_side_refuses_an_s_side_it_does_not_pin(
    keys: Path, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="vscsi.link"):
        s = session_to(keys, site.port, peer_sub="d")  # pins D's certificate for B
        try:
            assert not s.wait_connected(0.5)
        finally:
            s.close()
    assert "cannot connect: TLS: CERTIFICATE_VERIFY_FAILED" in caplog.text


def test_a_certificate_with_another_serial_is_refused(
    keys: Path, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    site.server.close()
    site.server = site.make([dataclasses.replace(site.remote, serial=4242)])
    with caplog.at_level(logging.WARNING, logger="vscsi.link"):
        s = session_to(keys, site.port)
        try:
            assert not s.wait_connected(0.5)
        finally:
            s.close()
    assert "certificate says serial 1001, remote[0].serial is 4242" in caplog.text
    assert site.volume.writes == []


def test_a_hello_with_another_serial_is_refused(
    keys: Path, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="vscsi.link"):
        s = raw_client(keys, site.port, hello_serial=7)
        s.sendall(encode(FrameType.WRITE, 1, volume="s0", offset=0, fua=True, data=bytes(512)))
        assert closed(s)
    assert "HELLO says serial 7, its certificate 1001" in caplog.text
    assert site.volume.writes == []


# -- malformed frames ------------------------------------------------------------------------


def write_frame(seq: int = 1) -> bytes:
    return encode(FrameType.WRITE, seq, volume="s0", offset=0, fua=False, data=bytes(512))


@pytest.mark.parametrize(
    "frame",
    [
        b"JUNK" + write_frame()[4:],
        write_frame()[:6] + b"\x63" + write_frame()[7:],  # frame type 99
        write_frame(5),  # sequence 5 where 1 is due
        encode(FrameType.RESPONSE, 1, answers=1, status=Status.OK, error="", data=b""),
    ],
    ids=["magic", "type", "sequence", "response-from-p"],
)
def test_a_malformed_frame_drops_the_connection_and_is_not_applied(
    keys: Path, site: Site, frame: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="vscsi.link"):
        s = raw_client(keys, site.port)
        s.sendall(frame)
        assert closed(s)
    assert site.volume.writes == []
    assert "down: dropped:" in caplog.text


def test_a_write_with_bytes_left_over_is_not_applied(keys: Path, site: Site) -> None:
    good = encode(FrameType.FLUSH, 1, volume="s0")
    s = raw_client(keys, site.port)
    header = parse_header(good[:HEADER_SIZE])
    longer = (header.length + 1).to_bytes(4, "big")
    s.sendall(good[: HEADER_SIZE - 4] + longer + good[HEADER_SIZE:] + b"!")
    assert closed(s)
    assert site.volume.flushes == 0


# -- dead peers and reconnects ----------------------------------------------------------------


def test_a_stopped_server_fails_requests_at_once(session: LinkSession, site: Site) -> None:
    site.server.close()
    start = time.monotonic()
    with pytest.raises(LinkDown):
        for _ in range(100):  # until the session has seen the connection end
            session.flush("s0")
            time.sleep(0.01)
    assert time.monotonic() - start < TIMEOUT


def test_a_silent_peer_fails_requests_within_the_link_timeout(keys: Path, site: Site) -> None:
    proxy = Proxy(site.port)
    s = session_to(keys, proxy.port)
    try:
        assert s.wait_connected(5)
        s.write("s0", 0, bytes(512))
        proxy.cut.set()  # packets are lost from now on; nobody closes anything
        start = time.monotonic()
        with pytest.raises(LinkDown, match="lost"):
            s.write("s0", 512, bytes(512))
        assert time.monotonic() - start < TIMEOUT * 1.25 + 0.3
        assert not s.connected
        proxy.cut.clear()
        assert s.wait_connected(5)  # the link comes back by itself
        s.write("s0", 1024, b"z" * 512)
        assert bytes(site.volume.data[1024:1536]) == b"z" * 512
    finally:
        s.close()
        proxy.close()


def test_answers_that_came_while_the_receiver_was_held_up_keep_the_link(
    keys: Path, site: Site
) -> None:
    """The P side's receiving thread finds the socket empty, then does not run for longer than
    the link timeout (a loaded host, an emulated CPU); meanwhile a write is answered. When it
    runs again, the answer is waiting: the peer is alive and the write succeeds."""
    s = session_to(keys, site.port)
    try:
        assert s.wait_connected(5)
        s.write("s0", 0, bytes(512))
        assert s._conn is not None
        stream = s._conn.stream
        receive, held = stream.receive, threading.Event()

        def held_up_once(timeout: float) -> bool:
            if not held.is_set():
                return receive(timeout)
            held.clear()
            time.sleep(TIMEOUT * 1.4)  # after a look that found nothing
            return False

        stream.receive = held_up_once  # type: ignore[method-assign]
        held.set()
        while held.is_set():
            time.sleep(0.01)
        time.sleep(TIMEOUT * 0.6)  # the write goes out late in the hold-up, so the S side
        s.write("s0", 512, b"h" * 512)  # hears the next heartbeat within its own timeout
        assert s.connected
        assert bytes(site.volume.data[512:1024]) == b"h" * 512
    finally:
        s.close()


def test_a_peer_that_stops_reading_is_dropped_within_the_link_timeout(
    keys: Path, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """The S side answers on the thread that reads: a P side that sends requests but takes
    no answers must not hold that thread in a send for ever."""
    s = raw_client(keys, site.port)
    try:
        with caplog.at_level(logging.WARNING, logger="vscsi.link"):
            for seq in range(1, 65):  # 64 MiB of answers: more than both sockets buffer
                s.sendall(encode(FrameType.READ, seq, volume="s0", offset=0, length=1 << 20))
            deadline = time.monotonic() + TIMEOUT * 4 + 2
            while "down:" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        assert "link from siteA" in caplog.text and "down:" in caplog.text
    finally:
        s.close()
    again = session_to(keys, site.port)  # and the array takes the next connection
    try:
        assert again.wait_connected(5)
        again.write("s0", 0, b"n" * 512)
    finally:
        again.close()
    assert bytes(site.volume.data[:512]) == b"n" * 512


def test_the_session_reconnects_when_the_server_comes_back(
    session: LinkSession, site: Site
) -> None:
    port = site.port
    site.server.close()
    time.sleep(0.1)
    assert not session.connected
    site.link = dataclasses.replace(site.link, listen=("127.0.0.1", port))
    site.server = site.make()
    assert session.wait_connected(5)
    session.write("s0", 0, b"r" * 512, fua=True)
    assert site.volume.writes == [(0, 512, True)]


def test_a_closed_session_refuses_requests(session: LinkSession) -> None:
    session.close()
    with pytest.raises(LinkDown, match="closed"):
        session.flush("s0")


# -- helpers ---------------------------------------------------------------------------------


def recv_exactly(s: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def recv_frame(s: ssl.SSLSocket) -> Frame:
    header = parse_header(recv_exactly(s, HEADER_SIZE))
    payload = recv_exactly(s, header.length)
    return Frame(header.type, header.seq, parse_payload(header.type, payload))


def hello_frame(name: str, serial: int) -> bytes:
    return encode(FrameType.HELLO, 0, name=name, serial=serial, min_version=1, max_version=1)


def ok(seq: int) -> bytes:
    return encode(FrameType.RESPONSE, seq, answers=seq, status=Status.OK, error="", data=b"")


def raw_client(keys: Path, port: int, hello_serial: int = A[1]) -> ssl.SSLSocket:
    """A P side speaking frames by hand: TLS as A, then HELLO (answered unless refused)."""
    link, remote = array(keys, "a", B[0], "b", port)
    ctx = tls.context(link, [remote], server=False)
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))
    s.settimeout(5)
    s.sendall(hello_frame(A[0], hello_serial))
    if hello_serial == A[1]:
        assert recv_frame(s).type is FrameType.HELLO
    return s


def closed(s: ssl.SSLSocket) -> bool:
    """The S side closed the connection (without answering anything)."""
    try:
        return s.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True
    finally:
        s.close()


class Proxy:
    """A TCP relay whose `cut` holds every byte (a link losing all packets) until cleared."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.upstream))
            self.socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                cut_at = self.cut.is_set()
                while self.cut.is_set():
                    time.sleep(0.01)
                if cut_at:
                    return  # what was held is lost: the connection it belonged to is over
                dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            s.close()


# -- link_netns --------------------------------------------------------------------------------


@pytest.fixture
def netns_name() -> Iterator[str]:
    """A fresh network namespace with its loopback up (needs root, as `ip netns add` does)."""
    if os.geteuid() != 0:
        pytest.skip("making a network namespace needs root")
    from pyroute2 import NetNS, netns

    name = f"vscsi-test-{os.getpid()}"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        yield name
    finally:
        netns.remove(name)


def test_link_sockets_live_in_the_configured_namespace(
    keys: Path, site: Site, netns_name: str
) -> None:
    """Server and session both in namespace N: they reach each other on N's loopback, and
    nothing in the daemon's own namespace can reach the server."""
    site.server.close()
    site.link = dataclasses.replace(site.link, netns=netns_name)
    site.server = site.make()
    port = site.port
    link, remote = array(keys, "a", B[0], "b", port)
    s = LinkSession(dataclasses.replace(link, netns=netns_name), remote, backoff=BACKOFF)
    s.start()
    try:
        assert s.wait_connected(5)
        s.write("s0", 0, b"n" * 512)
        assert bytes(site.volume.data[:512]) == b"n" * 512
        with pytest.raises(ConnectionRefusedError):  # 127.0.0.1 here is another loopback
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        here = os.readlink("/proc/thread-self/ns/net")
        assert here == os.readlink("/proc/self/ns/net")  # only the link's threads moved
    finally:
        s.close()


def test_a_missing_namespace_fails_start_with_its_name(keys: Path) -> None:
    link, remote = array(keys, "a", B[0], "b", 1)
    s = LinkSession(dataclasses.replace(link, netns="vscsi-no-such-ns"), remote)
    with pytest.raises(OSError, match="network namespace vscsi-no-such-ns"):
        s.start()


def test_a_name_that_is_not_a_network_namespace_fails_start(keys: Path) -> None:
    """A file under /run/netns that is no namespace (setns refuses it): the link does not
    start in the daemon's own network instead."""
    if os.geteuid() != 0:
        pytest.skip("/run/netns belongs to root")
    name = f"vscsi-test-file-{os.getpid()}"
    path = netns.path_of(name)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"")
    try:
        link, remote = array(keys, "a", B[0], "b", 1)
        s = LinkSession(dataclasses.replace(link, netns=name), remote)
        with pytest.raises(OSError, match=f"network namespace {name}: Invalid argument"):
            s.start()
    finally:
        path.unlink()


def test_both_ends_send_each_frame_at_once(session: LinkSession, site: Site) -> None:
    """TCP_NODELAY on both sockets: with Nagle's algorithm an answer would wait for the
    peer's delayed ACK of the previous one, tens of milliseconds per mirrored write."""
    session.flush("s0")
    (peer,) = site.server._peers
    conn = session._conn
    assert conn is not None
    for sock in (peer.sock, conn.stream.sock):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


class _HeldStream:
    """A stream whose first send waits for `release` (then fails with `error`, if set);
    records the sequence numbers of each send's frames, and the aborts."""

    def __init__(self, error: OSError | None = None) -> None:
        self.sends: list[list[int]] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self.error = error
        self.aborts = 0

    def send(self, *parts: bytes | memoryview) -> None:
        self.entered.set()
        if not self.sends:
            assert self.release.wait(10)
        self.sends.append([
            parse_header(bytes(p)).seq for p in parts
            if len(p) == HEADER_SIZE and bytes(p[:4]) == b"VSLK"
        ])  # fmt: skip
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        assert self.error is not None, "no send failed"
        self.aborts += 1


def test_requests_queued_during_a_send_leave_together_in_order() -> None:
    """Callers that queue while another sends are sent by the next caller in one send, in
    sequence order, each once; a heartbeat meanwhile neither waits nor sends."""
    stream = _HeldStream()
    conn = _Connection(stream)  # type: ignore[arg-type]

    def request() -> None:
        conn.request(FrameType.WRITE, [write_head("s0", 0, False), bytes(512)],
                     concurrent.futures.Future())  # fmt: skip

    first = threading.Thread(target=request)
    first.start()
    assert stream.entered.wait(10)
    others = [threading.Thread(target=request) for _ in range(7)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 10
    while conn.seq < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    conn.heartbeat()  # returns at once: a send is under way
    stream.release.set()
    for t in [first, *others]:
        t.join(10)
    assert stream.sends == [[1], [2, 3, 4, 5, 6, 7, 8]]
    assert sorted(conn.pending) == list(range(1, 9)) and conn.queued == []
    conn.heartbeat()  # nothing queued, nobody sending: it goes out alone
    assert stream.sends[-1] == [9]


def test_a_failed_send_fails_every_request_it_took_and_later_ones_send_nothing() -> None:
    """The first send fails while seven requests queue behind it: the next caller sends them
    and fails too (the stream is aborted, as a frame may be cut short); once the receiver
    fails the connection, every caller gets LinkDown and a new request raises at once."""
    stream = _HeldStream(ConnectionResetError(104, "reset"))
    conn = _Connection(stream)  # type: ignore[arg-type]
    futures = [concurrent.futures.Future[Any]() for _ in range(8)]

    def request(k: int) -> None:
        conn.request(FrameType.WRITE, [write_head("s0", 0, False), bytes(512)], futures[k])

    first = threading.Thread(target=request, args=(0,))
    first.start()
    assert stream.entered.wait(10)
    others = [threading.Thread(target=request, args=(k,)) for k in range(1, 8)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 10
    while conn.seq < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    stream.release.set()
    for t in [first, *others]:
        t.join(10)
    assert stream.sends == [[1], [2, 3, 4, 5, 6, 7, 8]] and stream.aborts == 2
    conn.fail(LinkDown("link to siteB lost"))  # what the receiver does on the reset
    assert all(isinstance(f.exception(0), LinkDown) for f in futures)
    with pytest.raises(LinkDown):
        request(0)
    assert len(stream.sends) == 2
