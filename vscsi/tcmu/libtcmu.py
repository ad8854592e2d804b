"""The libtcmu transport: the same volumes served through Debian's libtcmu.so.2 (libtcmu2 1.5.4).

`[daemon] transport = "libtcmu"` replaces our own ring code (`vscsi.tcmu.ring`, `.uio`) with
tcmu-runner's library, loaded with ctypes; the SCSI core (`Lun`) is the same. No headers are
shipped, so the ABI of 1.5.4 is declared here once (libtcmu.h, libtcmu_common.h and the private
libtcmu_priv.h of tag v1.5.4) and tests/unit/test_libtcmu_abi.py checks it against the library.

Who discovers devices and who hears netlink. libtcmu would do both: `tcmulib_initialize` joins
the TCM-USER `config` multicast group, sends SET_FEATURES(SUPP_KERN_CMD_REPLY=1), then scans
/dev/uio* and attaches every device whose cfgstring subtype matches a handler; afterwards it
answers every ADDED / REMOVED / RECONFIG event, with -ENOENT for a device it has no handler for
(libtcmu.c `handle_netlink`, `device_add`). The kernel takes the first reply as the answer, so
a listening libtcmu would fail tcmu-runner's devices and other vscsi daemons' (the trap
`vscsi.tcmu.netlink` describes). Therefore:

* device discovery is libtcmu's start-up scan only. The daemon makes (or finds) every backstore
  first, then calls `tcmulib_initialize` once; our handler's subtype is `configfs.SUBTYPE`, the
  one in our backstores' cfgstring, and its `check_config` accepts exactly the cfgstrings of
  this daemon's volumes, so libtcmu never blocks, resets or opens anyone else's device;
* netlink events belong to the daemon's own `NetlinkListener`, as with the native ring: right
  after `tcmulib_initialize` libtcmu's socket leaves the multicast group and is never read, so
  libtcmu answers nothing (a full socket buffer would also fail the kernel's multicast).

Ownership: libtcmu opens /dev/uioN without a lock and, for a device it attaches at start-up,
first writes `block_dev` and `reset_ring` — to a device another process serves, that would fail
its commands. So `check_config` first opens the device itself: target_core_user lets one process
open it at a time, and a busy device is refused with the same one-line error as the native path.

Differences from the native ring, all libtcmu 1.5.4's: at attach it resets the ring, so commands
queued while no daemon ran complete BUSY and the host retries them (the native ring serves them
in place); a failed doorbell is only logged by the library, so it cannot stop the daemon;
there is no spin after a batch. The commands libtcmu drops (a CDB it cannot size) are still
answered, from the ring (`LibtcmuDevice._answer_dropped`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    Union,
    byref,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any

from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.result import BUSY, CHECK_CONDITION, GOOD, TASK_SET_FULL, Result
from vscsi.tcmu import abi
from vscsi.tcmu.configfs import SUBTYPE
from vscsi.tcmu.doorbell import Doorbell
from vscsi.tcmu.ring import BAD_ENTRY_SENSE, CommandHandler
from vscsi.tcmu.uio import SYSFS_UIO, UioError

log = logging.getLogger(__name__)

LIBRARY = "libtcmu.so.2"
SENSE_BUFFERSIZE = 96  # libtcmu_common.h:67
PATH_MAX = 4096

# TCMU_STS_* (libtcmu_common.h:29-63): what tcmulib_command_complete turns into a SCSI status.
STS_OK = 0
STS_NO_RESOURCE = 1  # TASK SET FULL
STS_PASSTHROUGH_ERR = 2  # CHECK CONDITION with the caller's sense_buf
STS_BUSY = 3
_STS = {GOOD: STS_OK, BUSY: STS_BUSY, TASK_SET_FULL: STS_NO_RESOURCE}

# The CDB length by group code, as tcmu_cdb_get_length (api.c:31-60) sizes the copy it makes;
# get_next_command hands out no command of another group (0x7F is 8 + cdb[7]).
_CDB_LEN = (6, 10, 10, 0, 16, 12)
SOL_NETLINK = 270
NETLINK_DROP_MEMBERSHIP = 2


class LibtcmuError(Exception):
    """libtcmu cannot be loaded or started; the message is one line for the operator."""


# -- the ABI of libtcmu 1.5.4 (x86_64) ----------------------------------------------------------


class Iovec(Structure):
    """struct iovec (sys/uio.h)."""

    _fields_ = [("iov_base", c_void_p), ("iov_len", c_size_t)]


class TcmulibCmd(Structure):
    """struct tcmulib_cmd (libtcmu_common.h:99-106). libtcmu mallocs it with the iovecs and a
    copy of the CDB behind it; `tcmulib_command_complete` frees it."""

    _fields_ = [
        ("cmd_id", c_uint16),
        ("cdb", POINTER(c_uint8)),
        ("iovec", POINTER(Iovec)),
        ("iov_cnt", c_size_t),
        ("sense_buf", c_uint8 * SENSE_BUFFERSIZE),
        ("hm_private", c_void_p),
    ]


class _CfgData(Union):
    _fields_ = [("dev_size", c_uint64), ("dev_cfgstring", c_char_p), ("write_cache", c_bool)]


class TcmulibCfgInfo(Structure):
    """struct tcmulib_cfg_info (libtcmu.h:32-40): what a RECONFIG event changes."""

    _fields_ = [("type", c_int), ("data", _CfgData)]


CHECK_CONFIG = CFUNCTYPE(c_bool, c_char_p, POINTER(c_char_p))
RECONFIG = CFUNCTYPE(c_int, c_void_p, POINTER(TcmulibCfgInfo))
UPDATE_LOGDIR = CFUNCTYPE(c_bool)
ADDED = CFUNCTYPE(c_int, c_void_p)
REMOVED = CFUNCTYPE(None, c_void_p)


class TcmulibHandler(Structure):
    """struct tcmulib_handler (libtcmu.h:42-75); `tcmulib_initialize` copies it by value."""

    _fields_ = [
        ("name", c_char_p),
        ("subtype", c_char_p),
        ("cfg_desc", c_char_p),
        ("ctx", c_void_p),
        ("check_config", CHECK_CONFIG),
        ("reconfig", RECONFIG),
        ("update_logdir", UPDATE_LOGDIR),
        ("added", ADDED),
        ("removed", REMOVED),
        ("hm_private", c_void_p),
        ("connection", c_void_p),
    ]


class TcmuDevice(Structure):
    """struct tcmu_device (libtcmu_priv.h:38-68), private to libtcmu: the transport only passes
    pointers to it; tests build one around an in-process ring to run the real library."""

    _fields_ = [
        ("fd", c_int),
        ("map", c_void_p),
        ("map_len", c_size_t),
        ("cmd_tail", c_uint32),
        ("num_lbas", c_uint64),
        ("block_size", c_uint32),
        ("block_size_shift", c_uint32),
        ("max_xfer_len", c_uint32),
        ("opt_xcopy_rw_len", c_uint32),
        ("split_unmaps", c_bool),
        ("max_unmap_len", c_uint32),
        ("opt_unmap_gran", c_uint32),
        ("unmap_gran_align", c_uint32),
        # three `unsigned int x:1`: GCC puts them in byte 72 and dev_name right after, at 73
        # (tcmu_dev_get_uio_name says so), where a c_uint bit field would reserve 4 bytes
        ("write_cache_enabled", c_uint8, 1),
        ("solid_state_media", c_uint8, 1),
        ("unmap_enabled", c_uint8, 1),
        ("dev_name", c_char * 16),
        ("tcm_hba_name", c_char * 16),
        ("tcm_dev_name", c_char * 128),
        ("cfgstring", c_char * PATH_MAX),
        ("handler", c_void_p),
        ("ctx", c_void_p),
        ("hm_private", c_void_p),
    ]


# The functions the transport calls (tcmulib_master_fd_ready never: libtcmu hears no events).
_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "tcmulib_initialize": (c_void_p, [POINTER(TcmulibHandler), c_size_t]),
    "tcmulib_get_master_fd": (c_int, [c_void_p]),
    "tcmulib_close": (None, [c_void_p]),
    "tcmulib_get_next_command": (POINTER(TcmulibCmd), [c_void_p, c_int]),
    "tcmulib_command_complete": (None, [c_void_p, POINTER(TcmulibCmd), c_int]),
    "tcmulib_processing_start": (None, [c_void_p]),
    "tcmulib_processing_complete": (None, [c_void_p]),
    "tcmu_dev_get_fd": (c_int, [c_void_p]),
    "tcmu_dev_get_cfgstring": (c_char_p, [c_void_p]),
    "tcmu_dev_get_uio_name": (c_char_p, [c_void_p]),
    "tcmu_dev_oooc_supported": (c_bool, [c_void_p]),
    "tcmu_dev_get_memory_info": (
        c_void_p,
        [c_void_p, POINTER(c_void_p), POINTER(c_size_t), POINTER(ctypes.c_long)],
    ),
}


def load(path: str = LIBRARY) -> ctypes.CDLL:
    """The library with its prototypes declared, or LibtcmuError saying what to install."""
    try:
        lib = ctypes.CDLL(path)
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError) as e:
        raise LibtcmuError(
            f'daemon.transport = "libtcmu": cannot load {path} ({e}); install libtcmu2 '
            '(apt-get install libtcmu2) or set transport = "native"'
        ) from None
    return lib


_libc = ctypes.CDLL(None)
_libc.free.argtypes = [c_void_p]
_libc.free.restype = None
_libc.malloc.argtypes = [c_size_t]
_libc.malloc.restype = c_void_p


# -- one device -------------------------------------------------------------------------------


def _map(lib: Any, dev: int) -> tuple[memoryview, int]:
    """The device's whole shared map as a writable view, and its address."""
    base, length, offset = c_void_p(), c_size_t(), ctypes.c_long()
    name = lib.tcmu_dev_get_memory_info(dev, byref(base), byref(length), byref(offset))
    if name:
        _libc.free(name)  # the /dev path, malloc'd for us
    if not base.value or not length.value:
        raise UioError("libtcmu: no memory map for the device")
    mem = memoryview((c_char * length.value).from_address(base.value)).cast("B")
    return mem, base.value


class LibtcmuDevice:
    """One device libtcmu attached: served like `vscsi.tcmu.uio.RingDevice` (the same handler
    protocol, workers for commands that wait, one doorbell per batch), through the library."""

    def __init__(self, lib: Any, dev: int, name: str) -> None:
        self.lib = lib
        self.dev = dev
        self.name = name
        self.fd = lib.tcmu_dev_get_fd(dev)
        self.mem, self._base = _map(lib, dev)
        _v, flags, self._cmdr_off, self._cmdr_size, _h = abi.MAILBOX_HEAD.unpack_from(self.mem, 0)
        self._priv = TcmuDevice.from_address(dev)  # for its cmd_tail: where libtcmu fetched to
        self._seen = self._priv.cmd_tail  # entries before this one are accounted for
        self.ooo = bool(lib.tcmu_dev_oooc_supported(dev))
        self.read_len = bool(flags & abi.FLAG_CAP_READ_LEN)
        self.commands = 0
        self.error: str | None = None  # why serve() gave up: the daemon must not carry on
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._done = threading.Lock()  # tcmulib_command_complete is not thread-safe
        self._doorbell = Doorbell(lambda: self.lib.tcmulib_processing_complete(self.dev))

    def serve(self, handler: CommandHandler, stop: threading.Event, workers: int = 0) -> None:
        """Serve until `stop` is set (wake us with `wake()`) or something fails (`error`)."""
        pool = None
        try:
            if workers and self.ooo:
                pool = ThreadPoolExecutor(workers, f"{self.name}-io")
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            while not stop.is_set() and self.error is None:
                self._batch(handler, pool)
                for fd, _ev in poller.poll():  # stop() and close() write the wake pipe
                    if fd == self._wake_r:
                        os.read(self._wake_r, 64)
        except Exception as e:
            self._failed(e)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _batch(self, handler: CommandHandler, pool: ThreadPoolExecutor | None) -> None:
        """Clear the uio event, then take every queued command: the ones that may wait go to
        the workers, the rest are answered here and announced with one doorbell."""
        lib, dev = self.lib, self.dev
        lib.tcmulib_processing_start(dev)
        inline = 0
        while cmd := lib.tcmulib_get_next_command(dev, 0):
            inline += self._answer_dropped(handler, cmd.contents.cmd_id)
            cdb, buf = self._parse(cmd.contents)
            if pool is not None and buf is not None and handler.waits(cdb):
                pool.submit(self._work, handler, cmd, cdb, buf)
            else:
                self._complete(cmd, buf, _run(handler, cdb, buf))
                inline += 1
        inline += self._answer_dropped(handler, None)
        if inline:
            self._doorbell()

    def _answer_dropped(self, handler: CommandHandler, fetched: int | None) -> int:
        """Answer the CMD entries libtcmu skipped on its way to the command `fetched`.

        tcmulib_get_next_command drops a command whose CDB length it does not know (vendor
        opcodes 0xC0-0xFF, group 3 but 0x7F: libtcmu.c:1139-1148) and never hands it out; the
        kernel would time it out, and cmd_tail would lag one slot behind for good. Its entry
        is still intact (completions so far filled only slots before it), so it is run from
        the ring here — the LUN answers INVALID COMMAND OPERATION CODE as on the native ring —
        and completed through a tcmulib_cmd of our own (malloc'd: the library frees it)."""
        mem, end, pos = self.mem, self._priv.cmd_tail, self._seen
        answered = 0
        while pos != end:
            ent = self._cmdr_off + pos
            len_op, cmd_id, _kflags, _uflags = abi.HEADER.unpack_from(mem, ent)
            if not len_op & ~abi.OP_MASK:
                raise UioError(f"corrupt ring entry at {pos}: length 0")
            if len_op & abi.OP_MASK == abi.OP_CMD:
                if cmd_id == fetched:
                    fetched = None
                else:
                    self._answer_entry(handler, ent, cmd_id)
                    answered += 1
            pos = (pos + (len_op & ~abi.OP_MASK)) % self._cmdr_size
        self._seen = end
        return answered

    def _answer_entry(self, handler: CommandHandler, ent: int, cmd_id: int) -> None:
        mem = self.mem
        iov_cnt, _bidi, _dif, cdb_off = abi.CMD_COUNTS.unpack_from(mem, ent + 8)
        views = []
        for i in range(iov_cnt):
            base, ln = abi.IOVEC.unpack_from(mem, ent + abi.CMD_IOV_OFFSET + i * abi.IOVEC.size)
            views.append(mem[base : base + ln])
        buf = DataBuffer(views)
        cdb = bytes(mem[cdb_off : min(cdb_off + 16, len(mem))])
        cmd = ctypes.cast(_libc.malloc(ctypes.sizeof(TcmulibCmd)), POINTER(TcmulibCmd))
        if not cmd:
            raise MemoryError("malloc of a tcmulib_cmd")
        ctypes.memset(cmd, 0, ctypes.sizeof(TcmulibCmd))
        cmd.contents.cmd_id = cmd_id
        self._complete(cmd, buf, _run(handler, cdb, buf))

    def _parse(self, cmd: TcmulibCmd) -> tuple[bytes, DataBuffer | None]:
        """The CDB and the data buffer as views of the shared map (None: an iovec outside it)."""
        op = cmd.cdb[0]
        cdb = ctypes.string_at(cmd.cdb, 8 + cmd.cdb[7] if op == 0x7F else _CDB_LEN[op >> 5])
        n = cmd.iov_cnt
        if not n:
            return cdb, DataBuffer()
        pairs = (c_uint64 * (2 * n)).from_address(ctypes.addressof(cmd.iovec.contents))
        base, size = self._base, len(self.mem)
        views = []
        total = 0
        for i in range(0, 2 * n, 2):
            off, ln = pairs[i] - base, pairs[i + 1]
            if off < 0 or off + ln > size:
                return cdb, None
            views.append(self.mem[off : off + ln])
            total += ln
        return cdb, DataBuffer(views, total)

    def _work(self, handler: CommandHandler, cmd: Any, cdb: bytes, buf: DataBuffer) -> None:
        try:
            self._complete(cmd, buf, _run(handler, cdb, buf))
            self._doorbell()
        except Exception as e:
            self._failed(e)

    def _complete(self, cmd: Any, buf: DataBuffer | None, result: Result) -> None:
        """Answer one command: status and sense into the tcmulib_cmd, the residual (READ_LEN)
        into the ring slot the library is about to use, then tcmulib_command_complete."""
        sts = _sense_into(cmd.contents, result)
        with self._done:
            short = buf is not None and 0 < result.data_len < buf.length
            if self.read_len and result.status == GOOD and short:
                self._mark_read_len(result.data_len)
            self.lib.tcmulib_command_complete(self.dev, cmd, sts)
            self.commands += 1

    def _mark_read_len(self, n: int) -> None:
        """Set READ_LEN in the CMD slot at cmd_tail, the one tcmulib_command_complete fills
        (libtcmu.c:1312-1341; it writes cmd_id, status and sense there, not uflags or
        read_len), so the kernel reports the residual as it does for the native ring."""
        mem = self.mem
        _v, _f, cmdr_off, cmdr_size, head = abi.MAILBOX_HEAD.unpack_from(mem, 0)
        tail = abi.U32.unpack_from(mem, abi.MAILBOX_TAIL_OFFSET)[0]
        while tail != head:
            len_op = abi.U32.unpack_from(mem, cmdr_off + tail)[0]
            if len_op & abi.OP_MASK == abi.OP_CMD:
                break
            tail = (tail + (len_op & ~abi.OP_MASK)) % cmdr_size
        ent = cmdr_off + tail
        mem[ent + 7] |= abi.UFLAG_READ_LEN
        abi.U32.pack_into(mem, ent + 12, n)

    def _failed(self, e: Exception) -> None:
        """Record the first failure (one line) and wake the serving loop to stop."""
        if isinstance(e, UioError):
            why = str(e)
        else:
            log.error("%s: unexpected error", self.name, exc_info=e)
            why = f"unexpected {type(e).__name__}: {e}"
        if self.error is None:
            self.error = why
        self.wake()

    def drained(self) -> bool:
        """Every command the kernel queued is answered (cmd_tail caught up with cmd_head)."""
        head = abi.MAILBOX_HEAD.unpack_from(self.mem, 0)[4]
        return head == abi.U32.unpack_from(self.mem, abi.MAILBOX_TAIL_OFFSET)[0]

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def counts(self) -> tuple[int, int]:
        """Commands answered so far, and how many of them a compiled path answered: none
        here (the library hands every command to Python)."""
        return self.commands, 0

    def close(self) -> None:
        """Close our wake-up pipe; the uio fd and the map are libtcmu's (`Context.close`)."""
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1


def _run(handler: CommandHandler, cdb: bytes, buf: DataBuffer | None) -> Result:
    """Execute one command; a bad data buffer or a handler that raises is still answered."""
    if buf is None:
        return Result(CHECK_CONDITION, BAD_ENTRY_SENSE)
    try:
        return handler.execute(cdb, buf)
    except Exception:
        log.exception("command %s failed", cdb[:1].hex())
        return Result(CHECK_CONDITION, BAD_ENTRY_SENSE)


def _sense_into(cmd: TcmulibCmd, result: Result) -> int:
    """The TCMU_STS for `result`, its sense copied into cmd.sense_buf when it has one. A status
    libtcmu 1.5.4 cannot send (tcmu_sts_to_scsi knows GOOD, BUSY, TASK SET FULL and CHECK
    CONDITION) becomes HARDWARE ERROR rather than a wrong success."""
    sts = _STS.get(result.status)
    if sts is not None:
        return sts
    sense = result.sense
    if result.status != CHECK_CONDITION:
        log.error("status 0x%02x cannot go through libtcmu; answering HARDWARE ERROR",
                  result.status)  # fmt: skip
        sense = BAD_ENTRY_SENSE
    cmd.sense_buf[:] = sense[:SENSE_BUFFERSIZE].ljust(SENSE_BUFFERSIZE, b"\0")
    return STS_PASSTHROUGH_ERR


# -- the context: discovery at start-up, then deaf ---------------------------------------------


def held(uio: str) -> str | None:
    """Why /dev/`uio` cannot be ours (another process has it open), or None."""
    try:
        fd = os.open(f"/dev/{uio}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:  # target_core_user lets one process open it at a time
            try:
                name = (SYSFS_UIO / uio / "name").read_text().strip()
            except OSError:
                name = "?"
            return f"{uio} ({name}) is already served by another process"
        return f"{uio}: {e.strerror}"
    os.close(fd)
    return None


def leave_group(fd: int, group: int) -> None:
    """Take a netlink socket (libtcmu's) out of multicast `group`: it hears no more events."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, group)
    finally:
        sock.close()


class Context:
    """The daemon's one tcmulib context (libnl lets a process register the TCM-USER family
    once, so one context serves every volume)."""

    def __init__(
        self, lib: Any, group: int, probe: Callable[[str], str | None] | None = None
    ) -> None:
        self.lib = lib
        self.group = group  # the TCM-USER `config` multicast group libtcmu joins
        self.probe = probe or held
        self.devices: dict[str, LibtcmuDevice] = {}
        self._ctx: int | None = None
        self._keep: tuple[Any, ...] = ()  # the handler and its callbacks, alive while C has them

    def attach(self, uios: Mapping[str, str]) -> dict[str, LibtcmuDevice]:
        """Attach the devices of `uios` (volume -> the uioN its backstore has) through
        libtcmu's start-up scan; UioError names the first volume that could not be."""
        wanted = {f"{SUBTYPE}/{v}".encode(): v for v in uios}
        refused: dict[str, str] = {}

        def check(cfgstring: bytes, _reason: Any) -> bool:
            volume = wanted.get(cfgstring)
            if volume is None:
                return False  # not this daemon's: libtcmu leaves it alone
            why = self.probe(uios[volume])
            if why is not None:
                refused[volume] = why
            return why is None

        def added(dev: int) -> int:
            try:
                volume = wanted[self.lib.tcmu_dev_get_cfgstring(dev)]
                name = self.lib.tcmu_dev_get_uio_name(dev).decode()
                if name != uios[volume]:
                    refused[volume] = f"libtcmu found it on {name}, configfs on {uios[volume]}"
                    return -1
                self.devices[volume] = LibtcmuDevice(self.lib, dev, name)
            except Exception:
                log.exception("libtcmu: attaching a device failed")
                return -1
            return 0

        def removed(dev: int) -> None:
            return None  # libtcmu unmaps after this; our threads stopped before tcmulib_close

        callbacks = (CHECK_CONFIG(check), ADDED(added), REMOVED(removed))
        handler = TcmulibHandler(
            name=b"vscsi", subtype=SUBTYPE.encode(), cfg_desc=b"<volume name>",
            check_config=callbacks[0], added=callbacks[1], removed=callbacks[2],
        )  # fmt: skip
        self._keep = (handler, callbacks)
        ctx = self.lib.tcmulib_initialize(byref(handler), 1)
        if not ctx:
            raise LibtcmuError("libtcmu: tcmulib_initialize failed (its reason is on stderr above)")
        self._ctx = ctx
        leave_group(self.lib.tcmulib_get_master_fd(ctx), self.group)
        for volume, uio in uios.items():
            if volume not in self.devices:
                why = refused.get(volume, f"libtcmu did not attach {uio}")
                self.close()
                for d in self.devices.values():
                    d.close()
                raise UioError(f"volume {volume}: {why}")
        return self.devices

    def close(self) -> None:
        """tcmulib_close: it blocks each device and waits for its ring to empty, so it is
        called only when every ring is drained; otherwise the fds close when we exit."""
        if self._ctx is None:
            return
        stuck = [d.name for d in self.devices.values() if not d.drained()]
        if stuck:
            log.warning("libtcmu: commands still queued on %s; left to the kernel", stuck)
        else:
            self.lib.tcmulib_close(self._ctx)
        self._ctx = None
