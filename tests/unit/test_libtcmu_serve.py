"""The libtcmu transport's serving loop, two ways: a fake libtcmu that records every call (the
Result -> TCMU_STS and sense mapping, doorbells, workers), and the real libtcmu.so.2 working on
the in-process loopback ring behind a hand-made `struct tcmu_device` (what a host would see)."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from ctypes import POINTER, addressof
from typing import Any

import pytest

from tests.unit.scsi_harness import Sense, cdb, make_lun
from tests.unit.test_tcmu_ring import Disk, rw
from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.result import (
    BUSY,
    CHECK_CONDITION,
    GOOD,
    RESERVATION_CONFLICT,
    TASK_SET_FULL,
    Result,
)
from vscsi.tcmu import abi
from vscsi.tcmu.libtcmu import (
    Context,
    Iovec,
    LibtcmuDevice,
    LibtcmuError,
    TcmuDevice,
    TcmulibCmd,
    load,
)
from vscsi.tcmu.loopback import Completion, LoopbackKernel
from vscsi.tcmu.ring import BAD_ENTRY_SENSE
from vscsi.tcmu.uio import UioError

try:
    REAL: Any = load()
except LibtcmuError:
    REAL = None
needs_libtcmu = pytest.mark.skipif(REAL is None, reason="libtcmu2 is not installed")

# -- a fake libtcmu --------------------------------------------------------------------------

MAP = 1 << 20
DATA_OFF = 128 + 4096


class FakeLib:
    """Hands out commands whose iovecs point into a map of its own; records what comes back."""

    def __init__(self, ooo: bool = True) -> None:
        self.map = ctypes.create_string_buffer(MAP)
        flags = abi.FLAG_CAP_OOOC if ooo else 0
        abi.MAILBOX_HEAD.pack_into(self.map, 0, abi.MAILBOX_VERSION, flags, 128, 4096, 0)
        self.queue: list[Any] = []
        self.keep: list[Any] = []
        self.calls: list[str] = []
        self.completed: list[tuple[int, int, bytes, str]] = []
        self.next_data = DATA_OFF
        self.r, self.w = os.pipe2(os.O_NONBLOCK)
        self.ooo = ooo
        self.tdev = TcmuDevice(map=addressof(self.map), map_len=MAP)
        self.dev = addressof(self.tdev)

    def push(self, cmd_id: int, raw: bytes, data: bytes = b"", size: int = 0) -> memoryview:
        """Queue a command; returns its data buffer, a view of the map."""
        n = len(data) or size
        off, self.next_data = self.next_data, self.next_data + n
        ctypes.memmove(addressof(self.map) + off, data, len(data))
        iov = (Iovec * 1)((addressof(self.map) + off, n))
        c = (ctypes.c_uint8 * 16)(*raw)
        cmd = TcmulibCmd(cmd_id=cmd_id, cdb=c, iovec=iov, iov_cnt=1 if n else 0)
        self.keep += [iov, c, cmd]
        self.queue.append(ctypes.pointer(cmd))
        os.write(self.w, b"\1\0\0\0")
        return memoryview(self.map).cast("B")[off : off + n]

    def tcmu_dev_get_fd(self, _dev: int) -> int:
        return self.r

    def tcmu_dev_oooc_supported(self, _dev: int) -> bool:
        return self.ooo

    def tcmu_dev_get_memory_info(self, _dev: int, base: Any, length: Any, _off: Any) -> None:
        base._obj.value, length._obj.value = addressof(self.map), MAP

    def tcmulib_processing_start(self, _dev: int) -> None:
        self.calls.append("start")
        while True:
            try:
                os.read(self.r, 64)
            except BlockingIOError:
                return

    def tcmulib_get_next_command(self, _dev: int, _hm: int) -> Any:
        self.calls.append("next")
        return self.queue.pop(0) if self.queue else POINTER(TcmulibCmd)()

    def tcmulib_command_complete(self, _dev: int, cmd: Any, sts: int) -> None:
        c = cmd.contents
        self.calls.append(f"complete {c.cmd_id}")
        self.completed.append((c.cmd_id, sts, bytes(c.sense_buf), threading.current_thread().name))

    def tcmulib_processing_complete(self, _dev: int) -> None:
        self.calls.append("doorbell")


class Handler:
    """Runs `answer` for every command; WRITEs `wait` on workers."""

    def __init__(self, answer: Callable[[bytes, DataBuffer], Result]) -> None:
        self.answer = answer

    def execute(self, raw: bytes, buf: DataBuffer, replayed: bool = False) -> Result:
        return self.answer(raw, buf)

    def reset(self) -> None: ...

    def waits(self, raw: bytes) -> bool:
        return raw[0] == 0x2A


def serve(dev: Any, handler: Any, until: Callable[[], bool], workers: int = 0) -> None:
    """Run `dev.serve` in a thread until `until()` holds (20 s at most), then stop it."""
    stop = threading.Event()
    t = threading.Thread(target=dev.serve, args=(handler, stop, workers))
    t.start()
    deadline = time.monotonic() + 20
    try:
        while not until() and time.monotonic() < deadline and dev.error is None:
            time.sleep(0.005)
    finally:
        stop.set()
        dev.wake()
        t.join(5)
    assert dev.error is None and until()


def test_results_become_tcmu_statuses_with_sense_and_one_doorbell_per_batch() -> None:
    lib = FakeLib()
    sense = b"\x70\x00\x05\x00\x00\x00\x00\x0a" + bytes(4) + b"\x21\x00" + bytes(4)
    answers = {
        0x00: Result(GOOD),
        0x01: Result(CHECK_CONDITION, sense),
        0x02: Result(BUSY),
        0x03: Result(TASK_SET_FULL),
        0x04: Result(RESERVATION_CONFLICT),  # libtcmu 1.5.4 cannot send it
    }

    def answer(raw: bytes, _buf: DataBuffer) -> Result:
        if raw[0] == 0x05:
            raise RuntimeError("handler bug")
        return answers[raw[0]]

    for op in range(6):
        lib.push(10 + op, bytes([op]) + bytes(5))
    serve(LibtcmuDevice(lib, lib.dev, "uio0"), Handler(answer), lambda: len(lib.completed) == 6)
    got = {cmd_id: (sts, s) for cmd_id, sts, s, _ in lib.completed}
    hw = BAD_ENTRY_SENSE.ljust(96, b"\0")
    assert got[10][0] == 0 and got[12][0] == 3 and got[13][0] == 1
    assert got[11] == (2, sense.ljust(96, b"\0"))  # PASSTHROUGH_ERR: our sense, as it is
    assert got[14] == (2, hw) and got[15] == (2, hw)  # HARDWARE ERROR, never a dropped command
    batch = [x for i in range(6) for x in ("next", f"complete {10 + i}")]
    assert lib.calls[:15] == ["start", *batch, "next", "doorbell"]  # event cleared, then drained
    assert lib.calls.count("doorbell") == 1


def test_data_moves_in_place_in_the_shared_map() -> None:
    lib = FakeLib()

    def answer(raw: bytes, buf: DataBuffer) -> Result:
        if raw[0] == 0x28:
            return Result(GOOD, b"", buf.scatter(b"R" * 1024))
        assert buf.gather() == b"W" * 512
        return Result(GOOD)

    read = lib.push(1, rw(0x28, 0, 2), size=1024)
    lib.push(2, rw(0x2A, 0, 1), b"W" * 512)
    serve(LibtcmuDevice(lib, lib.dev, "uio0"), Handler(answer), lambda: len(lib.completed) == 2)
    assert bytes(read) == b"R" * 1024
    assert [(c, s) for c, s, _, _ in lib.completed] == [(1, 0), (2, 0)]


def test_an_iovec_outside_the_map_is_answered_hardware_error_unrun() -> None:
    lib = FakeLib()
    lib.push(1, rw(0x28, 0, 1), size=512)
    lib.queue[0].contents.iovec[0].iov_base = addressof(lib.map) + MAP - 100
    ran: list[bytes] = []
    handler = Handler(lambda raw, _b: ran.append(raw) or Result(GOOD))  # type: ignore[func-returns-value]
    serve(LibtcmuDevice(lib, lib.dev, "uio0"), handler, lambda: len(lib.completed) == 1)
    assert lib.completed[0][1:3] == (2, BAD_ENTRY_SENSE.ljust(96, b"\0")) and ran == []


def test_commands_that_wait_run_on_workers_and_complete_out_of_order() -> None:
    lib = FakeLib()
    release = threading.Event()

    def answer(raw: bytes, _buf: DataBuffer) -> Result:
        if raw[0] == 0x2A:
            assert release.wait(20)
        return Result(GOOD)

    lib.push(1, rw(0x2A, 0, 1), b"x" * 512)  # waits: a worker holds it
    lib.push(2, rw(0x28, 0, 1), size=512)  # answered at once, on the ring's thread

    def read_done() -> bool:
        if lib.completed:
            release.set()
        return len(lib.completed) == 2

    serve(LibtcmuDevice(lib, lib.dev, "uio0"), Handler(answer), read_done, workers=2)
    (first, _, _, t1), (second, _, _, t2) = lib.completed
    assert (first, second) == (2, 1)
    assert t2.startswith("uio0-io") and not t1.startswith("uio0-io")
    assert lib.calls.count("doorbell") == 2  # one for the inline batch, one from the worker


def test_without_out_of_order_completion_no_command_goes_to_a_worker() -> None:
    lib = FakeLib(ooo=False)
    lib.push(1, rw(0x2A, 0, 1), b"x" * 512)
    serve(LibtcmuDevice(lib, lib.dev, "uio0"), Handler(lambda *_: Result(GOOD)),
          lambda: len(lib.completed) == 1, workers=4)  # fmt: skip
    assert not lib.completed[0][3].startswith("uio0-io")


# -- the real libtcmu on the loopback ring ---------------------------------------------------


class LoopDevice:
    """A `LoopbackKernel` dressed as a uio device libtcmu attached: a `struct tcmu_device` whose
    map is the loopback's, and a socketpair for the uio fd (4 bytes each way are doorbells)."""

    def __init__(self, name: str = "uio9", cfgstring: str = "vscsi/v0", ooo: bool = True) -> None:
        flags = abi.FLAG_CAP_READ_LEN | (abi.FLAG_CAP_OOOC if ooo else 0)
        self.kernel = LoopbackKernel(flags=flags)
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        base = addressof(ctypes.c_char.from_buffer(self.kernel.mem))
        self.dev = TcmuDevice(
            fd=self.ours.fileno(), map=base, map_len=len(self.kernel.mem),
            dev_name=name.encode(), cfgstring=cfgstring.encode(),
        )  # fmt: skip
        self.reaper = threading.Thread(target=self._reap, daemon=True)
        self.reaper.start()

    @property
    def ptr(self) -> int:
        return addressof(self.dev)

    def _reap(self) -> None:
        """The kernel's side of the doorbell: reap the completions each time it rings."""
        while True:
            try:
                if not self.theirs.recv(4):
                    return
            except OSError:
                return
            self.kernel.reap()

    def execute(self, raw: bytes, data_out: bytes = b"", data_in_len: int = 0) -> Completion:
        cmd_id = self.kernel.submit(raw, data_out, data_in_len)
        assert cmd_id is not None
        pending = self.kernel.pending[cmd_id]
        self.theirs.send(b"\1\0\0\0")
        assert pending.done.wait(30), f"command {cmd_id} not completed"
        assert pending.completion is not None
        return pending.completion

    def close(self) -> None:
        self.theirs.close()
        self.ours.close()


class LoopLib:
    """The real libtcmu, except its context: `tcmulib_initialize` offers these loop devices to
    the handler the way libtcmu's start-up scan does (check_config, then added)."""

    def __init__(self, *devices: LoopDevice) -> None:
        self.devices = devices
        self.nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
        self.nl.bind((0, 0))
        self.nl.setsockopt(270, 1, 1)  # in multicast group 1, as libtcmu is in `config`
        self.handler: Any = None
        self.closed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(REAL, name)

    def tcmulib_initialize(self, handler: Any, _n: int) -> int:
        self.handler = h = handler._obj
        for d in self.devices:
            if h.check_config(d.dev.cfgstring, None):
                assert h.added(d.ptr) == 0
        return 0x5EED

    def tcmulib_get_master_fd(self, _ctx: int) -> int:
        return self.nl.fileno()

    def tcmulib_close(self, _ctx: int) -> None:
        self.closed += 1

    def groups(self) -> int:
        """The groups the socket is in, as a bit mask (NETLINK_LIST_MEMBERSHIPS: the kernel
        fills the first 4 bytes asked for and reports the length it would need)."""
        return int.from_bytes(self.nl.getsockopt(270, 9, 4)[:4], "little")


@pytest.fixture
def loop() -> Iterator[LoopDevice]:
    d = LoopDevice()
    yield d
    d.close()


def attach(*devices: LoopDevice, probe: Callable[[str], str | None] = lambda _u: None) -> Any:
    lib = LoopLib(*devices)
    ctx = Context(lib, 1, probe)
    return lib, ctx, ctx.attach({"v0": "uio9"})


@needs_libtcmu
def test_a_lun_served_through_the_real_libtcmu(loop: LoopDevice) -> None:
    lib, ctx, devices = attach(loop)
    dev = devices["v0"]
    stop = threading.Event()
    t = threading.Thread(target=dev.serve, args=(make_lun(), stop, 4))
    t.start()
    try:
        inq = loop.execute(cdb("INQUIRY", alloc_len=255), data_in_len=255)
        assert inq.status == GOOD and inq.data[8:13] == b"VSCSI"
        assert inq.read_len == inq.data[4] + 5 < 255  # the residual reaches the kernel
        data = os.urandom(4096)
        assert loop.execute(rw(0x2A, 16, 8), data).status == GOOD
        assert loop.execute(rw(0x28, 16, 8), data_in_len=4096).data == data
        past = loop.execute(rw(0x28, (8 << 20) // 512, 1), data_in_len=512)
        assert past.status == CHECK_CONDITION
        assert Sense.parse(past.sense[: 8 + past.sense[7]]).code == (5, 0x21, 0)
    finally:
        stop.set()
        dev.wake()
        t.join(5)
    assert dev.error is None and dev.drained()
    ctx.close()
    assert lib.closed == 1


@needs_libtcmu
def test_a_command_libtcmu_drops_is_still_answered(loop: LoopDevice) -> None:
    """libtcmu 1.5.4 hands out no command with a vendor-specific opcode; the LUN still says
    INVALID COMMAND OPERATION CODE, and the ring ends drained (cmd_tail caught up)."""
    _, ctx, devices = attach(loop)
    dev = devices["v0"]
    stop = threading.Event()
    t = threading.Thread(target=dev.serve, args=(make_lun(), stop, 0))
    t.start()
    try:
        for _ in range(3):  # in a batch with good commands, and alone
            k = loop.kernel
            ids = [k.submit(rw(0x28, 0, 1), data_in_len=512), k.submit(bytes([0xC5]) + bytes(5)),
                   k.submit(rw(0x28, 1, 1), data_in_len=512)]  # fmt: skip
            loop.theirs.send(b"\1\0\0\0")
            for cmd_id in ids:
                pending = k.pending.get(cmd_id)  # None: already completed
                assert pending is None or pending.done.wait(30), f"command {cmd_id} unanswered"
            vendor = k.completions[ids[1]]
            assert vendor.status == CHECK_CONDITION
            assert Sense.parse(vendor.sense[: 8 + vendor.sense[7]]).code == (5, 0x20, 0)
            assert [k.completions[i].status for i in (ids[0], ids[2])] == [GOOD, GOOD]
        alone = loop.execute(bytes([0xEE]) + bytes(9))
        assert Sense.parse(alone.sense[: 8 + alone.sense[7]]).code == (5, 0x20, 0)
    finally:
        stop.set()
        dev.wake()
        t.join(5)
    assert dev.error is None and dev.drained()
    ctx.close()


@needs_libtcmu
def test_writes_on_workers_complete_out_of_order_through_the_real_libtcmu(
    loop: LoopDevice,
) -> None:
    _, ctx, devices = attach(loop)
    dev, disk = devices["v0"], Disk()
    stop = threading.Event()
    t = threading.Thread(target=dev.serve, args=(disk, stop, 4))
    t.start()
    blobs = {lba: os.urandom(512) for lba in range(64)}
    try:
        writers = [
            threading.Thread(target=lambda a=lba: loop.execute(rw(0x2A, a, 1), blobs[a]))
            for lba in blobs
        ]
        for w in writers:
            w.start()
        for w in writers:
            w.join(10)
        for lba, blob in blobs.items():
            assert loop.execute(rw(0x28, lba, 1), data_in_len=512).data == blob
    finally:
        stop.set()
        dev.wake()
        t.join(5)
    assert dev.error is None and dev.drained()
    assert len(loop.kernel.completions) == 128
    ctx.close()


@needs_libtcmu
def test_attach_takes_only_this_daemons_devices_and_leaves_netlink(loop: LoopDevice) -> None:
    other = LoopDevice("uio3", "vscsi/v1")  # another vscsi daemon's volume
    runner = LoopDevice("uio4", "fbo/disk")  # a tcmu-runner device
    try:
        lib, ctx, devices = attach(other, runner, loop)
        assert list(devices) == ["v0"] and devices["v0"].name == "uio9"
        assert lib.groups() == 0  # libtcmu hears no event, answers none
        ctx.close()
    finally:
        other.close()
        runner.close()


@needs_libtcmu
def test_a_device_another_process_holds_is_refused_before_libtcmu_touches_it(
    loop: LoopDevice,
) -> None:
    with pytest.raises(UioError, match=r"^volume v0: uio9 \(x\) is already served by another"):
        attach(loop, probe=lambda uio: f"{uio} (x) is already served by another process")


@needs_libtcmu
def test_a_ring_with_commands_queued_is_not_closed_through_libtcmu(loop: LoopDevice) -> None:
    lib, ctx, _ = attach(loop)
    loop.kernel.submit(rw(0x28, 0, 1), data_in_len=512)  # nobody serves it
    ctx.close()  # tcmulib_close would wait for it forever
    assert lib.closed == 0
