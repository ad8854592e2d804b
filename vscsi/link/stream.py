"""TLS over a connected socket for threads, without an event loop: any thread sends whole
frames, one thread receives them.

An event loop costs a thread hop per request each way (the caller's thread to the loop and
back) and several layers of buffering; measured under emulation a hop costs more than
applying a 4 KiB write. Here the caller's thread encrypts and sends its own frame, and the one
receiving thread decrypts and parses. OpenSSL must not be entered by two threads at once, so
the TLS object sits behind `_tls`, taken only for the (non-blocking, in-memory) encryption and
decryption; socket I/O happens outside it, sends in order under `_send`.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time

from vscsi.link.frames import HEADER_SIZE, Frame, parse_header, parse_payload

RECV_SIZE = 1 << 18
RECORD = 16384  # the most plaintext one TLS record carries


class TlsStream:
    """One TLS connection. `send` from any thread; `receive` and `next_frame` from one."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        self._tls = threading.Lock()
        self.send_lock = threading.Lock()  # outermost: frames go out whole and in order
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._plain = bytearray()  # received and decrypted, not yet framed
        self._eof = False

    # -- setting up --------------------------------------------------------------------------

    def handshake(self, timeout: float) -> None:
        """The TLS handshake; TimeoutError, ssl.SSLError, OSError or EOFError if it fails."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self._tls:
                    self.tls.do_handshake()
                self._flush(wait=True)
                return
            except ssl.SSLWantReadError:
                self._flush(wait=True)
                if not self.receive(deadline - time.monotonic()):
                    raise TimeoutError from None

    def read_frame(self, timeout: float) -> Frame:
        """The next frame within `timeout` (the handshake's HELLO)."""
        deadline = time.monotonic() + timeout
        while (frame := self.next_frame()) is None:
            if not self.receive(deadline - time.monotonic()):
                raise TimeoutError
        return frame

    # -- sending -----------------------------------------------------------------------------

    def send(self, *parts: bytes | bytearray | memoryview) -> None:
        """Encrypt `parts` and send them, after any frame another thread is sending. An
        OSError leaves the stream unusable (a frame may be cut short): `abort` it. Small
        parts are joined first: each `write` ends a TLS record, and every record costs its
        own encryption and header."""
        with self.send_lock:
            with self._tls:
                for part in _records(parts):
                    self.tls.write(part)
                data = self._out.read()  # with whatever TLS itself wrote before: in order
            self.sock.sendall(data)

    def _flush(self, wait: bool) -> None:
        """Send what TLS itself wrote (handshake records, a key update answer). Without
        `wait`, a sender busy with a frame takes it along with its own (see `send`)."""
        if not self.send_lock.acquire(blocking=wait):
            return
        try:
            with self._tls:
                data = self._out.read()
            if data:
                self.sock.sendall(data)
        finally:
            self.send_lock.release()

    # -- receiving ---------------------------------------------------------------------------

    def receive(self, timeout: float) -> bool:
        """Wait up to `timeout` for bytes and decrypt them; False if none came (with no time
        left, whether some are there already). EOFError when the peer closed the connection,
        OSError or ssl.SSLError when it broke."""
        if self._eof:
            raise EOFError
        if not self._poll.poll(max(timeout, 0.0) * 1000):
            return False
        data = self.sock.recv(RECV_SIZE)
        if not data:
            self._eof = True
            raise EOFError
        with self._tls:
            self._in.write(data)
            self._decrypt()
            reply = self._out.pending
        if reply:
            self._flush(wait=False)  # the receiver never waits for a sender (see `abort`)
        return True

    def _decrypt(self) -> None:
        while True:
            try:
                chunk = self.tls.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self._eof = True
                return
            if not chunk:
                self._eof = True
                return
            self._plain += chunk

    def next_frame(self) -> Frame | None:
        """A whole frame from what was received, or None; FrameError if it is malformed."""
        plain = self._plain
        if len(plain) < HEADER_SIZE:
            return None
        header = parse_header(bytes(plain[:HEADER_SIZE]))
        end = HEADER_SIZE + header.length
        if len(plain) < end:
            return None
        payload = bytes(memoryview(plain)[HEADER_SIZE:end])  # one copy, not two
        del plain[:end]
        return Frame(header.type, header.seq, parse_payload(header.type, payload))

    # -- ending ------------------------------------------------------------------------------

    def abort(self) -> None:
        """End the connection with a reset, from any thread: a receiver waiting wakes with
        EOF, a sender fails, and what the kernel still holds for the peer is discarded (never
        delivered late). The owner closes the socket once its threads are done with it."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected (any more): nothing to end


Part = bytes | bytearray | memoryview


def _records(parts: tuple[Part, ...]) -> list[Part]:
    """`parts` with every run of small ones joined (up to RECORD bytes), large ones as they
    are (a MiB of data is not copied once more)."""
    out: list[Part] = []
    run: list[Part] = []
    size = 0
    for part in parts:
        n = len(part)
        if n >= RECORD or size + n > RECORD:
            if run:
                out.append(b"".join(run) if len(run) > 1 else run[0])
                run, size = [], 0
            if n >= RECORD:
                out.append(part)
                continue
        run.append(part)
        size += n
    if run:
        out.append(b"".join(run) if len(run) > 1 else run[0])
    return out
