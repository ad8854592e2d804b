"""The link alone: what one TLS connection between two arrays carries in this machine, with no
TCMU, no pair layer and no disk — the ceiling of a remote pair's mirrored writes here.

Two in-process ends (`LinkSession` and `LinkServer`, keys made by `vscsi link keys`) over
loopback TCP write into a memory volume, with the same job shapes as bench_io.py's pair jobs
(threads stand in for the host's queue depth). Also the link's cipher through the `ssl`
module: the MB/s of encrypting and decrypting 16 KiB records, the work every mirrored byte
costs on the two sides. Run by bench_io.py for its remote column, or alone:

    .venv/bin/python -m bench.bench_link
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from vscsi.config import LinkConfig, RemoteConfig
from vscsi.link.replica import RemoteReplica
from vscsi.link.session import LinkServer, LinkSession
from vscsi.link.tls import context

VSCSI = str(Path(sys.executable).with_name("vscsi"))
SIZE = 64 << 20
SECONDS = float(os.environ.get("VSCSI_LINK_SECONDS", "5"))
SITES = {"a": ("siteA", 1001), "b": ("siteB", 2002)}
Job = tuple[str, str, str, int]  # as bench_io's: name, fio's rw, block size, queue depth


class MemoryTarget:
    """What the S side writes into: a bytearray."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            b[:] = self.data[offset : offset + len(b)]
            offset += len(b)

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        for b in bufs:
            self.data[offset : offset + len(b)] = b
            offset += len(b)

    def flush(self) -> None:
        pass

    def unmap(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)


def arrays(keys: Path) -> tuple[LinkConfig, RemoteConfig, LinkConfig, RemoteConfig]:
    """Site A's link and its [[remote]] (B), then B's and its [[remote]] (A)."""
    for sub, (name, serial) in SITES.items():
        cmd = [VSCSI, "link", "keys", "--dir", str(keys / sub), "--name", name, "--serial",
               str(serial)]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    def end(me: str, peer: str) -> tuple[LinkConfig, RemoteConfig]:
        (name, serial), (peer_name, peer_serial) = SITES[me], SITES[peer]
        own = LinkConfig(str(keys / me / f"{name}.crt"), str(keys / me / f"{name}.key"), name,
                         serial, listen=("127.0.0.1", 0))  # fmt: skip
        return own, RemoteConfig(peer_name, "127.0.0.1", 0, peer_serial,
                                 str(keys / peer / f"{peer_name}.crt"))  # fmt: skip

    return *end("a", "b"), *end("b", "a")


SIZES = {"4k": 4096, "1M": 1 << 20}


def run_job(replica: RemoteReplica, size: int, depth: int, sequential: bool) -> float:
    """Writes per second (1M jobs: MiB/s) with `depth` writers for SECONDS."""
    data = memoryview(os.urandom(size))
    slots = SIZE // size
    done = [0] * depth
    stop = time.monotonic() + SECONDS

    def writer(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            k = (i + n * depth) if sequential else (i * 7919 + n * 104729)
            replica.write((k % slots) * size, [data])
            n += 1
        done[i] = n

    start = time.monotonic()
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - start)


def link_alone(jobs: list[Job]) -> dict[str, float]:
    """Each of bench_io's write jobs (its PAIR_JOBS) through the link alone, by name."""
    logging.getLogger("vscsi.link").setLevel(logging.ERROR)  # not its "link down" at the end
    with tempfile.TemporaryDirectory() as tmp:
        a, to_b, b, to_a = arrays(Path(tmp))
        target = MemoryTarget(SIZE)
        server = LinkServer(b, [to_a], lambda _peer, name: target if name == "sv" else None)
        server.start()
        to_b = RemoteConfig(to_b.name, "127.0.0.1", server.address[1], to_b.serial, to_b.peer_cert)
        session = LinkSession(a, to_b)
        session.start()
        try:
            if not session.wait_connected(60):
                raise RuntimeError("the link did not come up")
            replica = RemoteReplica(session, "sv")
            return {name: run_job(replica, SIZES[bs], depth, rw == "write")
                    for name, rw, bs, depth in jobs}  # fmt: skip
        finally:
            session.close()
            server.close()


def cipher_mbps() -> tuple[str, float]:
    """The cipher the link negotiates, and MB/s of 16 KiB records encrypted on one end and
    decrypted on the other (one thread: the two sides' work per mirrored byte)."""
    with tempfile.TemporaryDirectory() as tmp:
        a, to_b, b, to_a = arrays(Path(tmp))
        bios = [ssl.MemoryBIO() for _ in range(4)]
        client = context(a, [to_b], server=False).wrap_bio(bios[0], bios[1])
        server = context(b, [to_a], server=True).wrap_bio(bios[2], bios[3], server_side=True)
        for _ in range(10):  # the handshake, through memory
            for end in (client, server):
                with contextlib.suppress(ssl.SSLWantReadError):
                    end.do_handshake()
            bios[2].write(bios[1].read())
            bios[0].write(bios[3].read())
        record = os.urandom(16384)
        n, start = 0, time.monotonic()
        while time.monotonic() - start < min(SECONDS, 3):
            client.write(record)
            bios[2].write(bios[1].read())
            server.read(len(record))
            n += 1
        cipher = client.cipher()
        return (cipher[0] if cipher else "?"), n * len(record) / (time.monotonic() - start) / 1e6


def main() -> None:
    from bench.bench_io import PAIR_JOBS  # (bench_io imports this module)

    name, mbps = cipher_mbps()
    print(f"cipher {name}: {mbps:,.0f} MB/s encrypted and decrypted")
    for job, rate in link_alone(PAIR_JOBS).items():
        print(f"{job}: {rate:,.0f} {'MiB/s' if job.startswith('seq') else 'writes/s'}")


if __name__ == "__main__":
    main()
