"""The TCMU command ring, served from userspace.

`Ring` works on any writable buffer laid out like the uio map — the kernel's (through
`vscsi.tcmu.uio`) or the in-process loopback's — so the same code runs under test everywhere.

Completion protocol (target_core_user.c `tcmu_handle_completions`): on each notify the kernel
walks from its last cleaned entry up to `cmd_tail`, skips PAD and TMR entries, and finds the
command of every CMD entry by the `cmd_id` in its header. A completion is written into the CMD
slot at `cmd_tail`, and `cmd_tail` then moves past that slot. Commands may run in any order (a
thread pool), but each is answered in its own slot, in ring order: one that finishes early is
held until every command before it is answered. The kernel would take it in the older slot
(`TCMU_MAILBOX_FLAG_CAP_OOOC`), but that slot's request would then be gone — a daemon killed
before the older command finished would leave it to time out (`cmd_time_out`, CHECK
CONDITION to the host) and would serve the early one a second time from its own slot, a
`cmd_id` the kernel no longer knows ("ring is broken"). The price is paid where commands
differ in speed: on a P-VOL mirrored to a peer array, a READ behind a write still on the link
is answered with that write (after up to `link_timeout` when the peer dies). Every entry is
still parsed (CDB copied, iov views taken) before it is handed out.

The ring starts from the mailbox's current `cmd_tail`, so a daemon that re-opens a device after
a crash serves exactly the commands that were not answered: every slot from `cmd_tail` on holds
its own request — unless the killed daemon was answering it. The response shares the slot with
the request (a union) and must be there before `cmd_tail` moves past it, so a daemon killed
between the two leaves a slot whose request counts hold a status: served again, a WRITE would
find no data (05/0E/03 to the host) and a READ nothing to read into.

Answered before the restart. The kernel zeroes each entry before it fills it
(`queue_cmd_ring`), so an untouched request is recognisable (`_untouched`): no DIF iovecs, zero
padding, `cdb_off` just past its iovecs (or past the 112-byte response, whichever is further),
a length in every iovec it counts and zeros after them. We answer in an order that keeps the
slot readable: the header, then for CHECK CONDITION the sense (its first 8 bytes in one store:
a sense buffer's first byte is never zero), then status and read_len in one 8-byte store
(`ring_store_u64`), then `cmd_tail`. So a replayed slot that is not untouched shows the whole
answer when its sense area is still zero (published as it is: the command ran, its data moved),
or a sense being written (answered BUSY, which the host retries: the old answer may be torn).
The compiled path leaves replayed entries to this code.

Commands already in the ring when the `Ring` attaches may have run before the old daemon died,
so each comes out marked `replayed` and reaches the handler as `execute(..., replayed=True)`:
a command that is not idempotent (COMPARE AND WRITE) may then accept its own earlier effect
instead of failing on it. What the kernel queues after the attach is fresh.

Memory ordering. The kernel fills an entry, then publishes it with `smp_store_release` on
`cmd_head` (UPDATE_HEAD in target_core_user.c); it reads `cmd_tail` with READ_ONCE and only then
the completed entries. So every fetch of `cmd_head` is an acquire load (the entries and write
data up to it are visible once we see it; libtcmu does the same for the aarch64 crash of
tcmu-runner issue 688), and every `cmd_tail` store is a release store (the response, sense and
read data written before it are visible to whoever sees the new tail). Both are C atomics
(`vscsi.tcmu._ring_c`) because Python has no fences; on x86 (TSO) they compile to plain moves.
Only the head loads in `fetch()` need acquire — `pending()` just peeks, and `fetch()` re-reads —
and the tail store is the single publishing store of each completion.

The compiled path. `serve_fast()` hands the ring to C (csrc/fastpath.c) for the leading
READ/WRITE(10/16) entries the LUN says are plain data movement (`Lun.direct`); C answers those
GOOD in their own slots, rings the doorbell, and stops at the first entry it does not own,
which `fetch()` then parses for the Python core — or, with the ring empty, watches it and
serves what comes, for as long as commands keep coming within a short idle window, up to a
limit after which the loop looks at the LUN again. It runs only while nothing is outstanding, so its
completions are in ring order whatever the pool does.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import threading
from contextlib import AbstractContextManager
from typing import Any, Protocol

from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.lun import FAST_MASKS, FastPath
from vscsi.scsi.result import BUSY, CHECK_CONDITION, GOOD, Result
from vscsi.store.base import DirectIo
from vscsi.tcmu import abi
from vscsi.tcmu._ring_c import ffi, lib

log = logging.getLogger(__name__)

# HARDWARE ERROR / INTERNAL TARGET FAILURE (04/44/00), fixed format, for entries we cannot use.
BAD_ENTRY_SENSE = bytes([0x70, 0, 0x04, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x44, 0x00, 0, 0, 0, 0])
_CDB_SIZE = (6, 10, 10, 16, 16, 12, 16, 16)  # by group code (opcode >> 5)
_MAILBOX_HEAD = 12
_SENSE = 16  # the response's sense buffer, from the start of the entry
_RESETS = (abi.TMR_LUN_RESET, abi.TMR_TARGET_WARM_RESET, abi.TMR_TARGET_COLD_RESET)
_IOV_SIZE = abi.IOVEC.size


class CommandHandler(Protocol):
    """What serves the commands: the SCSI core's `Lun`."""

    def execute(
        self, cdb: bytes | memoryview, buf: DataBuffer, replayed: bool = False
    ) -> Result: ...

    def reset(self) -> None: ...

    def direct(self) -> AbstractContextManager[FastPath | None]:
        """What the compiled path may serve while held (`Lun.direct`)."""
        ...

    def waits(self, cdb: bytes) -> bool:
        """Whether the command may wait on something slower than this host (a peer array):
        such commands run on workers, the rest at once on the ring's thread."""
        ...


class FastStop(enum.IntEnum):
    """Why the compiled path gave the ring back (ring_serve_fast_for's return values)."""

    EMPTY = 0  # it answered everything queued: the loop sleeps on the ring's event
    CORE = 1  # it stopped at an entry the core must serve: the core's turn
    LIMIT = 2  # its time ran out with commands coming: the loop looks at the LUN, then C again


class RingError(Exception):
    """The ring itself is unusable (bad mailbox, corrupt entry header): stop serving it."""


class Before(enum.Enum):
    """What a replayed entry's slot shows of the killed daemon's answer (module doc)."""

    NOTHING = 0  # the request as the kernel wrote it: serve it
    ANSWERED = 1  # the whole response: publish it as it is
    TORN = 2  # a CHECK CONDITION's sense being written: answer BUSY, the host retries


class Command:
    """One parsed CMD entry: everything needed to run and answer it once its slot is reused.

    `replayed`: the entry was already queued when this daemon attached (see the module doc).
    """

    __slots__ = ("bad", "before", "buf", "cdb", "cmd_id", "replayed", "slot")

    def __init__(
        self, cmd_id: int, cdb: bytes, buf: DataBuffer, bad: bool = False,
        before: Before = Before.NOTHING,
    ) -> None:  # fmt: skip
        self.cmd_id = cmd_id
        self.cdb = cdb
        self.buf = buf
        self.bad = bad
        self.before = before
        self.replayed = False
        self.slot = -1  # where its entry starts in the ring: where it is answered


_EMPTY = DataBuffer()
_BAD_RESULT = Result(CHECK_CONDITION, BAD_ENTRY_SENSE)
_RETRY_RESULT = Result(BUSY)
_KEPT_RESULT = Result(GOOD)  # for Before.ANSWERED: the slot's own answer stands, nothing written


def cdb_length(opcode: int, mem: memoryview, cdb_off: int) -> int:
    """The length of the CDB at `cdb_off` (variable-length CDBs carry their own)."""
    if opcode == 0x7F:
        return 8 + mem[cdb_off + 7]
    return _CDB_SIZE[opcode >> 5]


def _untouched(mem: memoryview, ent: int, length: int) -> bool:
    """Whether the CMD entry at `ent` still holds the request the kernel wrote (module doc)."""
    iov_cnt, bidi, dif, cdb_off = abi.CMD_COUNTS.unpack_from(mem, ent + 8)
    iovs = iov_cnt + bidi
    iovs_end = abi.CMD_IOV_OFFSET + _IOV_SIZE * iovs
    base = abi.cmd_base_size(iovs)
    pads = mem[ent + 20 : ent + 24], mem[ent + 32 : ent + abi.CMD_IOV_OFFSET]
    if dif or any(pads[0]) or any(pads[1]) or base > length or cdb_off != ent + base:
        return False
    lengths = (abi.IOVEC.unpack_from(mem, ent + abi.CMD_IOV_OFFSET + _IOV_SIZE * i)[1]
               for i in range(iovs))  # fmt: skip
    return all(lengths) and not any(mem[ent + iovs_end : ent + base])


def _answered_before(mem: memoryview, ent: int) -> Before:
    """For a replayed entry that is not untouched: how much of an answer its slot holds."""
    if any(mem[ent + _SENSE : ent + _SENSE + 8]):
        return Before.TORN
    return Before.ANSWERED


def _set_mirrors(lun: Any, io: DirectIo) -> tuple[Any, ...]:
    """Fill `lun`'s S-VOL fields from `io` (a P-VOL in PAIR, see `DirectIo`); returns the
    cffi buffers the struct points into, to be kept alive while C runs."""
    if not io.mirrors or io.intent is None:
        lun.writes = io.writes and not io.mirrors  # a mirrored write needs the lent log
        lun.mirrors, lun.region, lun.nregions = 0, 1, 0
        lun.ready = lun.touched = ffi.NULL
        return ()
    lun.mirrors = len(io.mirrors)
    for i, (fd, direct_fd) in enumerate(io.mirrors):
        lun.mirror_fd[i], lun.mirror_direct_fd[i] = fd, direct_fd
    region, ready, touched = io.intent
    keep = ffi.from_buffer(ready), ffi.from_buffer(touched, require_writable=True)
    lun.region, lun.nregions = region, len(ready)
    lun.ready, lun.touched = keep
    return keep


class Ring:
    """One device's command ring over its shared memory.

    `process()` serves in order on the calling thread. For overlap, `fetch()` hands out parsed
    commands and `complete()` (thread-safe) takes each as it finishes, in any order, and
    answers it once those before it are answered (module doc).
    """

    def __init__(
        self, mem: memoryview | bytearray, handler: CommandHandler, name: str = "ring"
    ) -> None:
        self.mem = memoryview(mem).cast("B")
        self.handler = handler
        self.name = name
        version, flags, cmdr_off, cmdr_size, head = abi.MAILBOX_HEAD.unpack_from(self.mem, 0)
        if version != abi.MAILBOX_VERSION:
            raise RingError(f"mailbox version {version}, expected {abi.MAILBOX_VERSION}")
        if cmdr_off < abi.MAILBOX_TAIL_OFFSET + 4 or cmdr_off + cmdr_size > len(self.mem):
            raise RingError(
                f"command ring {cmdr_off}+{cmdr_size} outside the {len(self.mem)}-byte map"
            )
        self.flags = flags
        self.cmdr_off = cmdr_off
        self.cmdr_size = cmdr_size
        self.data_off = cmdr_off + cmdr_size
        self.read_len = bool(flags & abi.FLAG_CAP_READ_LEN)
        self.commands = 0
        self.bad_entries = 0
        self.entries = 0
        self._tail = self.tail  # only we write cmd_tail: keep our own copy
        if self._tail >= cmdr_size or self._tail % abi.ENTRY_ALIGN:
            raise RingError(f"cmd_tail {self._tail} outside the {cmdr_size}-byte ring")
        self._next = self._tail  # the first entry not parsed yet
        # Entries before this offset were queued before we attached: replayed (-1: none left).
        self._replay_end = head if head != self._tail else -1
        self.replayed: collections.Counter[Before] = collections.Counter()
        self._ptr = ffi.from_buffer(self.mem, require_writable=True)
        self._lock = threading.Lock()
        self._finished: dict[int, tuple[Command, Result]] = {}  # by slot, until answered
        self._warned_op = False
        self.fast_commands = 0  # of `commands`, those the compiled path answered
        self._fast = ffi.new("struct fast_ring *")
        self._fast.base = self._ptr
        self._fast.map_len = len(self.mem)
        self._fast.cmdr_off, self._fast.cmdr_size = cmdr_off, cmdr_size
        self._fast.data_off = self.data_off
        self._fast_lun = ffi.new("struct fast_lun *")
        for i, mask in enumerate(FAST_MASKS):
            self._fast_lun.masks[i] = list(mask)

    @property
    def tail(self) -> int:
        return abi.U32.unpack_from(self.mem, abi.MAILBOX_TAIL_OFFSET)[0]

    @property
    def head(self) -> int:
        """cmd_head, loaded with acquire: the entries before it are then safe to read."""
        return lib.ring_load_acquire_u32(self._ptr, _MAILBOX_HEAD)

    def pending(self) -> bool:
        """Entries the kernel queued that we have not read yet (a peek: `fetch` re-reads)."""
        return abi.U32.unpack_from(self.mem, _MAILBOX_HEAD)[0] != self._next

    def outstanding(self) -> bool:
        """Commands handed out and not completed yet."""
        return self._tail != self._next

    def process(self) -> int:
        """Serve every queued entry in order; returns how many entries were consumed.

        The caller notifies the kernel once afterwards when the count is non-zero.
        """
        before = self.entries
        for cmd in self.fetch():
            self.complete(cmd, self.run(cmd))
        return self.entries - before

    def serve_fast(
        self,
        path: FastPath,
        doorbell: int,
        idle: float,
        limit: float,
        event: int = -1,
        max_idle: float = 0.0,
    ) -> tuple[int, FastStop]:
        """Serve in C the leading entries `path` allows (module doc), ring `doorbell` (a
        descriptor) for them and, for a host at QD1, watch the ring for more while commands
        come within `idle` seconds of each other (widened up to `max_idle` while they come
        just after it), for up to `limit` seconds (see ring_serve_fast_for; while another
        ring watches, this one sleeps on its `event` descriptor instead, if it has one).
        Returns how many entries were consumed and why it stopped. Nothing while commands
        are out with workers (the core's turn). OSError when the doorbell fails."""
        with self._lock:
            if self._tail != self._next:
                return 0, FastStop.CORE
        r, lun, io = self._fast, self._fast_lun, path.io
        r.pos, r.replay_end = self._next, self._replay_end
        lun.fd, lun.direct_fd, lun.reads, lun.writes = io.fd, io.direct_fd, io.reads, io.writes
        keep = _set_mirrors(lun, io)
        lun.block_size, lun.blocks, lun.max_blocks = path.block_size, path.blocks, path.max_blocks
        entries, commands = r.entries, r.commands
        widest = max(idle, max_idle)
        rc = lib.ring_serve_fast_for(
            r, lun, doorbell, event, int(idle * 1e9), int(widest * 1e9), int(limit * 1e9)
        )
        del keep
        with self._lock:
            self._next = self._tail = r.pos
            self.commands += r.commands - commands
            self.fast_commands += r.commands - commands
            self.entries += r.entries - entries
        if rc < 0:
            raise OSError(-rc, f"doorbell: {os.strerror(-rc)}")
        return r.entries - entries, FastStop(rc)

    def fetch(self, limit: int = 0) -> list[Command]:
        """Parse every entry between the last one read and cmd_head (with `limit`, up to and
        including that many CMD entries).

        PAD entries are consumed, TMRs applied; CMD entries come back as `Command`s (malformed
        ones marked `bad`, to be answered with HARDWARE ERROR like any other).
        """
        mem = self.mem
        size = self.cmdr_size
        pos = self._next
        head = self.head
        replay_end = self._replay_end
        out: list[Command] = []
        while pos != head:
            if head >= size:
                raise RingError(f"cmd_head {head} outside the {size}-byte ring")
            ent = self.cmdr_off + pos
            len_op, cmd_id, _kflags, _uflags = abi.HEADER.unpack_from(mem, ent)
            length = len_op & ~abi.OP_MASK
            if length == 0 or length % abi.ENTRY_ALIGN or pos + length > size:
                raise RingError(f"corrupt entry at {pos}: length {length}")
            op = len_op & abi.OP_MASK
            if op == abi.OP_CMD:
                if length < abi.CMD_ENTRY_MIN:
                    raise RingError(f"command entry at {pos} too short for a response: {length}")
                if replay_end >= 0 and not _untouched(mem, ent, length):
                    cmd = Command(cmd_id, b"", _EMPTY, before=_answered_before(mem, ent))
                else:
                    cmd = self._parse(ent, length, cmd_id)
                cmd.replayed = replay_end >= 0
                if cmd.replayed:
                    self.replayed[cmd.before] += 1
                cmd.slot = pos
                out.append(cmd)
            elif op == abi.OP_TMR:
                self._tmr(ent)
            elif op != abi.OP_PAD and not self._warned_op:
                self._warned_op = True
                log.warning("ring entry at %d has unknown opcode %d; skipped", pos, op)
            pos = (pos + length) % size
            self.entries += 1
            if pos == replay_end:
                replay_end = -1
                self._log_replayed()
            if limit and len(out) == limit:
                break
            if pos == head:
                head = self.head  # more may have arrived while we worked: batch them
        with self._lock:
            self._next = pos
            self._replay_end = replay_end
            self._skip_to_command(self._tail)
        return out

    def _log_replayed(self) -> None:
        """One line once every entry from before the attach is read: what became of them."""
        n = self.replayed
        if n.total():
            log.info(
                "%s: %d command(s) queued across the restart: %d served again, %d answered "
                "before it (answer kept), %d answered BUSY (an answer was being written)",
                self.name, n.total(), n[Before.NOTHING], n[Before.ANSWERED], n[Before.TORN],
            )  # fmt: skip

    def run(self, cmd: Command) -> Result:
        """Execute one command; a handler that raises still gets its command answered."""
        if cmd.bad:
            return _BAD_RESULT
        if cmd.before is not Before.NOTHING:
            return _KEPT_RESULT if cmd.before is Before.ANSWERED else _RETRY_RESULT
        try:
            if cmd.replayed:
                return self.handler.execute(cmd.cdb, cmd.buf, replayed=True)
            return self.handler.execute(cmd.cdb, cmd.buf)
        except Exception:
            log.exception("command %s failed", cmd.cdb[:1].hex())
            return _BAD_RESULT

    def complete(self, cmd: Command, result: Result) -> int:
        """Take `cmd`'s result and answer, in ring order, every finished command from
        cmd_tail on; returns how many were answered (0: `cmd` waits for an older one).
        Thread-safe."""
        with self._lock:
            if not self._open(cmd.slot) or cmd.slot in self._finished:
                raise RingError(f"completion of command {cmd.cmd_id} that is not outstanding")
            self._finished[cmd.slot] = (cmd, result)
            answered = 0
            while self._tail != self._next and self._tail in self._finished:
                self._answer(*self._finished.pop(self._tail))
                answered += 1
            return answered

    def _open(self, slot: int) -> bool:
        """Whether `slot` lies between cmd_tail and the next entry to read (handed out)."""
        size = self.cmdr_size
        return (slot - self._tail) % size < (self._next - self._tail) % size

    def _answer(self, cmd: Command, result: Result) -> None:
        """Fill the CMD slot at cmd_tail (`cmd`'s own), in the order the module doc gives, and
        move cmd_tail past it."""
        mem = self.mem
        tail = self._tail
        ent = self.cmdr_off + tail
        len_op, _id, kflags, _uflags = abi.HEADER.unpack_from(mem, ent)
        if cmd.before is not Before.ANSWERED:
            read_len = 0
            if self.read_len and result.status == GOOD and 0 < result.data_len < cmd.buf.length:
                read_len = result.data_len
            uflags = abi.UFLAG_READ_LEN if read_len else 0
            abi.HEADER.pack_into(mem, ent, len_op, cmd.cmd_id, kflags, uflags)
            if result.status == CHECK_CONDITION:  # the only status the kernel takes sense with
                sense = result.sense[: abi.SENSE_BUFFERSIZE].ljust(abi.SENSE_BUFFERSIZE, b"\0")
                lib.ring_store_u64(self._ptr, ent + _SENSE, int.from_bytes(sense[:8], "little"))
                mem[ent + _SENSE + 8 : ent + _SENSE + abi.SENSE_BUFFERSIZE] = sense[8:]
            lib.ring_store_u64(self._ptr, ent + 8, result.status | read_len << 32)
        self.commands += 1
        self.bad_entries += cmd.bad
        self._skip_to_command((tail + (len_op & ~abi.OP_MASK)) % self.cmdr_size)

    def _skip_to_command(self, tail: int) -> None:
        """Publish `tail`, first moving it over read PAD/TMR slots: only CMD slots carry
        completions (the kernel skips the others when it reaps)."""
        mem = self.mem
        base = self.cmdr_off
        while tail != self._next:
            len_op = abi.U32.unpack_from(mem, base + tail)[0]
            if len_op & abi.OP_MASK == abi.OP_CMD:
                break
            tail = (tail + (len_op & ~abi.OP_MASK)) % self.cmdr_size
        self._tail = tail
        lib.ring_store_release_u32(self._ptr, abi.MAILBOX_TAIL_OFFSET, tail)

    def release(self) -> None:
        """Let go of the shared memory (the map can then be closed)."""
        ffi.release(self._ptr)
        self.mem.release()

    def _parse(self, ent: int, length: int, cmd_id: int) -> Command:
        mem = self.mem
        iov_cnt, bidi, dif, cdb_off = abi.CMD_COUNTS.unpack_from(mem, ent + 8)
        iovs_end = ent + abi.CMD_IOV_OFFSET + _IOV_SIZE * (iov_cnt + bidi + dif)
        if iovs_end > ent + length or not self.cmdr_off <= cdb_off < self.data_off:
            return Command(cmd_id, b"", _EMPTY, bad=True)
        n = cdb_length(mem[cdb_off], mem, cdb_off)
        if cdb_off + n > self.data_off:
            return Command(cmd_id, b"", _EMPTY, bad=True)
        cdb = bytes(mem[cdb_off : cdb_off + n])
        views = []
        total = 0
        end = len(mem)
        pos = ent + abi.CMD_IOV_OFFSET
        for _ in range(iov_cnt):
            base, ln = abi.IOVEC.unpack_from(mem, pos)
            if base < self.data_off or base + ln > end:
                return Command(cmd_id, cdb, _EMPTY, bad=True)
            views.append(mem[base : base + ln])
            total += ln
            pos += _IOV_SIZE
        return Command(cmd_id, cdb, DataBuffer(views, total))

    def _tmr(self, ent: int) -> None:
        """Task management. An abort needs nothing from us — the kernel still waits for the
        aborted commands' completions, which they get — while a LUN or target reset resets
        the LUN's state (reservations, unit attentions)."""
        if self.mem[ent + 8] in _RESETS:
            self.handler.reset()
