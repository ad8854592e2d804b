"""`WriteIntentLog`: a crash-safe record of the regions that may have writes in flight.

A mirrored write marks its regions durable *before* it is issued (`begin`), and they are
cleared lazily once idle after it completed everywhere (`end`). After a crash, `recover()`
returns every region that may differ between members, so a minimerge copies only those.

On-disk format (at `offset` in a file or device), little endian, 4096-byte pages:

- header page: magic ``VSCSIWIL``, u32 version, u32 page size, u64 volume size, u64 region,
  u64 grain, u64 generation, u32 CRC-32 of the preceding bytes;
- bitmap pages: u32 CRC-32 of the rest of the page, u32 page number, then 4088 bytes of
  bitmap (one bit per region; 32704 regions per page).

A page whose checksum fails (a torn write) counts as all dirty. Pages are written in place,
each write carrying the newest in-memory state, serialised, then fdatasync'd (group commit:
concurrent `begin` callers share one flush). Every page remembers the flush generation that will
carry its latest change, so `begin` on regions already durable does no I/O at all.

Forgetting a region is the dangerous step. A region is cleared only when nothing is in flight in
it *and* the data (and every record derived from it) of the writes that marked it is durable at
a generation taken after the region went idle: `flush_idle` picks the idle regions, then calls
the owner's `before_clear` (which flushes the members and checkpoints the dependent records, all
stamped after the pick), then clears only the regions with no `begin` since the pick. A `begin`
on a marked region does no I/O, so a per-region begin epoch, not the I/O, tells that a write
raced the checkpoint. A `before_clear` that raises keeps every region.

A writer that checks marks itself (the ring's compiled path, in C) borrows the log (`lend`):
`ready` says per region whether its mark is durable, and the writer writes only there, flagging
each region it writes in `touched`. While the log is lent nothing is cleared; when the last
borrower gives it back (`give_back`), each touched region counts as a write begun and ended
then, so a clear that picked it before keeps it.

A host's sequential stream of large writes would mark a new region with nearly every write,
and each mark is a flush and a trip off the compiled path. So a host write (`begin(...,
stream=True)`) of at least STREAM bytes that marks a region after a marked one also marks the
AHEAD regions after it, in the same flush, as if written and ended then: its stream finds them
durable, and unused they are idle-cleared like any other. Marking more than was written is
safe; a crash then costs those regions' copy. Small writes never mark ahead (random ones in a
hot area would log, and after a crash copy, regions nobody wrote), nor do copies and update
copies (a resync's chunks are no stream, and would log regions past what it copies).

Opening a log adopts what is on disk: the regions a crashed run left marked stay marked (they
are never idle-cleared) until `mark_clean()` after the merge. A missing, unreadable or
differently shaped log is formatted afresh with `valid` False; `recover()` then raises
`InvalidLogError` and the caller must fall back to a full merge (`open_existing` raises at once).

The log does its I/O through a `LogFile` (`OsFile` by default) so a crash-model test can put
a file with a volatile cache under it. Fault points (`vscsi.durable.faults`): ``wil.begin.flush``
(marked in memory, before the flush that makes the mark durable), ``wil.flush.page`` (before
each page write), ``wil.flush.sync`` (pages written, before fdatasync), ``wil.flush.synced``
(durable, not yet acknowledged), ``wil.clear.checkpointed`` (after `before_clear` returned,
before the re-check), ``wil.clear.flush`` (bits cleared in memory, before their flush) and
``wil.mark_clean.flush``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import Protocol

from vscsi.durable.faults import fault_point
from vscsi.tracker.dirtymap import DirtyMap

log = logging.getLogger(__name__)

PAGE = 4096
_MAGIC = b"VSCSIWIL"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQQ")
_PAGE_HEAD = struct.Struct("<II")
_BITS_PER_PAGE = (PAGE - _PAGE_HEAD.size) * 8
AHEAD = 16  # regions a stream of large writes marks past its write (module doc)
STREAM = 256 << 10  # a write at least this large is taken for part of a stream
_RETRY_MAX = 30.0  # seconds between cleaner attempts while before_clear keeps failing


class InvalidLogError(ValueError):
    """The log is missing, unreadable or of another geometry: fall back to a full merge."""


class LogFile(Protocol):
    """The file (or device) the log lives in; `fdatasync` makes every earlier pwrite durable."""

    def pread(self, length: int, offset: int) -> bytes: ...

    def pwrite(self, data: bytes, offset: int) -> None: ...

    def fdatasync(self) -> None: ...

    def close(self) -> None: ...


class OsFile:
    """A `LogFile` on a real path: each method is one system call."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def pwrite(self, data: bytes, offset: int) -> None:
        if os.pwrite(self.fd, data, offset) != len(data):
            raise OSError(errno.EIO, "short write to the write-intent log")

    def fdatasync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class WriteIntentLog:
    """Regions (of `region` bytes) of a `size`-byte volume with writes that may be in flight.

    `before_clear` is called (unlocked, from the cleaner thread or whoever calls `flush_idle`)
    before idle regions are forgotten. Its contract: when it returns, the data of every write
    that ended before it was called is durable on every member, and so is every record that
    depends on those writes (e.g. a pair's change map), saved at a generation taken during the
    call. Writes may begin and end while it runs; their regions are kept. If it cannot make
    that true it must raise: every region stays marked, and the cleaner retries later.

    `file` replaces the file opened at `path` (a crash-model test's fake); `background=False`
    starts no cleaner thread, so only explicit `flush_idle` calls clear regions.
    """

    def __init__(
        self,
        path: str,
        size: int,
        region: int = 4 << 20,
        grain: int = 65536,
        *,
        offset: int = 0,
        idle_delay: float = 1.0,
        before_clear: Callable[[], None] | None = None,
        file: LogFile | None = None,
        background: bool = True,
    ) -> None:
        if size <= 0:
            raise ValueError(f"volume size must be positive, not {size}")
        if region < grain or region % grain:
            raise ValueError(f"region {region} must be a multiple of grain {grain}")
        self.path, self.size, self.region, self.grain = path, size, region, grain
        self.offset = offset
        self.idle_delay = idle_delay
        self._before_clear = [] if before_clear is None else [before_clear]
        self.background = background
        self.nregions = max(-(-size // region), 1)
        self.npages = -(-self.nregions // _BITS_PER_PAGE)
        self._bits = bytearray(self.npages * (PAGE - _PAGE_HEAD.size))
        self._ready = bytearray(self.nregions)  # 1 where the region's mark is durable
        self._touched = bytearray(self.nregions)  # flagged by borrowers (`lend`)
        self._lent = 0
        self._clearing = False
        self._page_gen = [0] * self.npages
        self._inflight: dict[int, int] = {}
        self._idle_since: dict[int, float] = {}
        self._epoch = 0  # counts begins; never reused, so a pick can tell a begin happened since
        self._begun: dict[int, int] = {}  # region -> epoch of its latest begin (until cleared)
        self._dirty_pages: set[int] = set()
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)  # the last borrower gave the log back
        self._io_lock = threading.Lock()
        self._stop = threading.Event()
        self._next_gen = 1
        self._durable_gen = 0
        self._held = False
        self._cleaner: threading.Thread | None = None
        self.flushes = 0
        self.generation = 0
        self.valid = False
        self._io: LogFile = OsFile(path) if file is None else file
        self._closed = False
        try:
            self._adopt()
        except BaseException:
            self._io.close()
            raise

    @classmethod
    def open_existing(
        cls, path: str, size: int, region: int = 4 << 20, grain: int = 65536, **kw: object
    ) -> WriteIntentLog:
        """Open a log that must already exist with this geometry, or raise InvalidLogError."""
        if kw.get("file") is None and not os.path.exists(path):
            raise InvalidLogError(f"{path}: no write-intent log")
        log = cls(path, size, region, grain, **kw)  # type: ignore[arg-type]
        if not log.valid:
            log.close()
            raise InvalidLogError(f"{path}: write-intent log invalid or of another geometry")
        return log

    # -- on disk ------------------------------------------------------------------------------

    def _header(self, generation: int) -> bytes:
        head = _HEADER.pack(_MAGIC, _VERSION, PAGE, self.size, self.region, self.grain, generation)
        return (head + struct.pack("<I", zlib.crc32(head))).ljust(PAGE, b"\0")

    def _adopt(self) -> None:
        """Take over the log on disk, or format a fresh one (then `valid` stays False)."""
        try:
            self._load()
            self.valid = True
        except InvalidLogError:
            self._format()

    def _load(self) -> None:
        raw = self._io.pread(PAGE, self.offset)
        if len(raw) < _HEADER.size + 4:
            raise InvalidLogError(f"{self.path}: no header")
        head = raw[: _HEADER.size]
        (crc,) = struct.unpack_from("<I", raw, _HEADER.size)
        magic, version, page, size, region, grain, gen = _HEADER.unpack(head)
        if magic != _MAGIC or version != _VERSION or zlib.crc32(head) != crc:
            raise InvalidLogError(f"{self.path}: bad header")
        if (page, size, region, grain) != (PAGE, self.size, self.region, self.grain):
            raise InvalidLogError(f"{self.path}: geometry differs")
        self.generation = gen + 1
        self._io.pwrite(self._header(self.generation), self.offset)
        span = PAGE - _PAGE_HEAD.size
        for p in range(self.npages):
            data = self._io.pread(PAGE, self.offset + PAGE * (1 + p))
            crc_p, num = _PAGE_HEAD.unpack_from(data.ljust(PAGE, b"\0"))
            body = data[_PAGE_HEAD.size :]
            if len(data) != PAGE or num != p or zlib.crc32(body) != crc_p:
                self._bits[p * span : (p + 1) * span] = b"\xff" * span
            else:
                self._bits[p * span : (p + 1) * span] = body
        self._io.fdatasync()
        for r in self._marked_unlocked():
            self._ready[r] = 1

    def _format(self) -> None:
        self.generation = 1
        self._io.pwrite(self._header(self.generation), self.offset)
        for p in range(self.npages):
            self._io.pwrite(self._page(p), self.offset + PAGE * (1 + p))
        self._io.fdatasync()

    def _page(self, p: int) -> bytes:
        span = PAGE - _PAGE_HEAD.size
        body = bytes(self._bits[p * span : (p + 1) * span])
        return _PAGE_HEAD.pack(zlib.crc32(body), p) + body

    def _flush(self, need: int) -> None:
        """Write every changed page (its newest state) unless a flush already covered `need`.

        A failed flush puts its pages back, so the next one rewrites them: after a failed
        fdatasync the kernel may have dropped them, and a later success proves nothing.
        """
        with self._io_lock:
            with self._lock:
                if self._durable_gen >= need:
                    return
                gen = self._next_gen
                self._next_gen += 1
                pages = [(p, self._page(p)) for p in sorted(self._dirty_pages)]
                self._dirty_pages.clear()
            try:
                for p, data in pages:
                    fault_point("wil.flush.page")
                    self._io.pwrite(data, self.offset + PAGE * (1 + p))
                fault_point("wil.flush.sync")
                self._io.fdatasync()
            except BaseException:
                with self._lock:
                    self._dirty_pages.update(p for p, _ in pages)
                raise
            fault_point("wil.flush.synced")
            self.flushes += 1
            with self._lock:
                self._durable_gen = max(self._durable_gen, gen)

    # -- the write path -------------------------------------------------------------------------

    def _regions(self, offset: int, length: int) -> range:
        if length <= 0 or offset >= self.size:
            return range(0)
        end = min(offset + length, self.size)
        return range(offset // self.region, (end - 1) // self.region + 1)

    def _changed(self, page: int) -> None:
        """The page differs from disk: the next flush to start must carry it."""
        self._dirty_pages.add(page)
        self._page_gen[page] = self._next_gen

    def begin(self, offset: int, length: int, stream: bool = False) -> None:
        """Mark the regions of a write about to be issued; returns once the mark is durable.
        `stream`: the write may be part of a sequential stream (a host's), so a large one
        may mark ahead (module doc); copies and update copies never do.
        A write that marks a region after the two before it marks the AHEAD regions after
        it too, in the same flush (module doc).

        If the mark cannot be made durable this raises and the write counts as never begun.
        """
        need = 0
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
            regions = self._regions(offset, length)
            fresh = False
            for r in regions:
                self._inflight[r] = self._inflight.get(r, 0) + 1
                self._begun[r] = epoch
                page = r // _BITS_PER_PAGE
                if self._mark(r):
                    fresh = True
                need = max(need, self._page_gen[page])
            streaming = fresh and stream and length >= STREAM
            ahead = self._mark_ahead(regions, epoch) if streaming else []
            for r in ahead:
                need = max(need, self._page_gen[r // _BITS_PER_PAGE])
            if self._cleaner is None and self.background:
                self._start_cleaner()
            if need <= self._durable_gen:
                self._set_ready(offset, length)
                return
        try:
            fault_point("wil.begin.flush")
            self._flush(need)
        except BaseException:
            self.end(offset, length)  # the caller will not issue the write, nor call end
            raise
        with self._lock:  # in flight, so not cleared since: the mark is durable
            self._set_ready(offset, length)
            for r in ahead:  # not in flight: durable only if nothing cleared it since
                if self._begun.get(r) == epoch:
                    self._ready[r] = 1

    def _mark(self, r: int) -> bool:
        """Under the lock: set region r's bit; whether it was clear (its page changed)."""
        byte, bit = divmod(r, 8)
        if self._bits[byte] >> bit & 1:
            return False
        self._bits[byte] |= 1 << bit
        self._changed(r // _BITS_PER_PAGE)
        return True

    def _mark_ahead(self, regions: range, epoch: int) -> list[int]:
        """Under the lock, for a large write: when the region before `regions` is marked (a
        stream, most likely), mark the AHEAD after it as if written and ended now, so the
        stream's next writes find their marks durable. Unused, they are idle-cleared."""
        first = regions.start
        if first < 1 or not self._is_marked(first - 1):
            return []
        now = time.monotonic()
        ahead = []
        for r in range(regions.stop, min(regions.stop + AHEAD, self.nregions)):
            if self._mark(r):
                self._begun[r] = epoch
                if r not in self._inflight:
                    self._idle_since[r] = now
                ahead.append(r)
        return ahead

    def _is_marked(self, r: int) -> bool:
        byte, bit = divmod(r, 8)
        return bool(self._bits[byte] >> bit & 1)

    def _set_ready(self, offset: int, length: int) -> None:
        for r in self._regions(offset, length):
            self._ready[r] = 1

    def end(self, offset: int, length: int) -> None:
        """The write completed (or failed) on every member; its regions may be cleared once
        idle, after `before_clear` made its data durable."""
        now = time.monotonic()
        with self._lock:
            for r in self._regions(offset, length):
                n = self._inflight.get(r, 0) - 1
                if n <= 0:
                    self._inflight.pop(r, None)
                    self._idle_since[r] = now
                else:
                    self._inflight[r] = n

    # -- borrowers that write where the marks are durable --------------------------------------

    def lend(self) -> tuple[bytearray, bytearray] | None:
        """(`ready`, `touched`) for a borrower (module doc) until `give_back`; None while a
        clear is under way: the writer then begins its intents as usual."""
        with self._lock:
            if self._clearing or self._closed:
                return None
            self._lent += 1
            return self._ready, self._touched

    def give_back(self) -> None:
        """A borrower is done; the last one turns the touched regions into ended writes."""
        now = time.monotonic()
        with self._lock:
            self._lent -= 1
            if self._lent:
                return
            r = self._touched.find(1)
            while r >= 0:
                self._touched[r] = 0
                self._epoch += 1
                self._begun[r] = self._epoch
                if r not in self._inflight:
                    self._idle_since[r] = now
                r = self._touched.find(1, r + 1)
            self._returned.notify_all()

    # -- clearing -------------------------------------------------------------------------------

    def add_before_clear(self, make_durable: Callable[[], None]) -> None:
        """Another owner of records that depend on these marks (a pair over a shadow set that
        shares the set's log): its checkpoint runs after the others, under the same contract."""
        self._before_clear.append(make_durable)

    def hold(self) -> None:
        """A member is missing: keep every mark (the log is now its minicopy record)."""
        with self._lock:
            self._held = True

    def release(self) -> None:
        with self._lock:
            self._held = False

    def _start_cleaner(self) -> None:
        self._cleaner = threading.Thread(target=self._clean_loop, name="wil-cleaner", daemon=True)
        self._cleaner.start()

    def _clean_loop(self) -> None:
        """Clear idle regions until closed; a failure keeps them and backs off, never stops."""
        delay = base = max(self.idle_delay / 2, 0.01)
        while not self._stop.wait(delay):
            try:
                self.flush_idle()
                delay = base
            except Exception as e:
                delay = min(delay * 2, max(_RETRY_MAX, base))
                log.warning("%s: regions kept, clearing retried in %.1fs: %s", self.path, delay, e)

    def flush_idle(self, now: float | None = None) -> int:
        """Clear regions idle for `idle_delay`; returns how many were cleared.

        Raises what `before_clear` or the log's own flush raised; the regions then stay marked.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._held:
                return 0
            picked = {
                r: self._begun.get(r, 0)
                for r, t in self._idle_since.items()
                if now - t >= self.idle_delay and r not in self._inflight
            }
        if not picked:
            return 0
        for make_durable in list(self._before_clear):
            make_durable()  # makes durable what the picked regions' writes left behind
        fault_point("wil.clear.checkpointed")
        with self._lock:
            if self._held:
                return 0
            self._clearing = True  # no new borrower; the ones out finish their writes
            try:
                while self._lent:
                    self._returned.wait()
                cleared = self._clear_unraced(picked)
            finally:
                self._clearing = False
            need = self._next_gen
        fault_point("wil.clear.flush")
        self._flush(need)
        return len(cleared)

    def _clear_unraced(self, picked: dict[int, int]) -> list[int]:
        """Under the lock: clear the picked regions no write began in since the pick (one that
        did, in flight or not, raced the checkpoint: keep it)."""
        cleared = [
            r for r, e in picked.items() if self._begun.get(r, 0) == e and r not in self._inflight
        ]
        for r in cleared:
            self._idle_since.pop(r, None)
            self._begun.pop(r, None)
            self._ready[r] = 0
            byte, bit = divmod(r, 8)
            self._bits[byte] &= ~(1 << bit) & 0xFF
            self._changed(r // _BITS_PER_PAGE)
        return cleared

    def mark_clean(self) -> bool:
        """Clear everything (clean dismount, or a finished merge) unless a write is in flight.

        The caller must already have made every member durable and equal.
        """
        with self._lock:
            if self._inflight or self._held or self._lent:
                return False
            self._bits[:] = bytes(len(self._bits))
            self._ready[:] = bytes(len(self._ready))
            self._idle_since.clear()
            self._begun.clear()
            for page in range(self.npages):
                self._changed(page)
            need = self._next_gen
        fault_point("wil.mark_clean.flush")
        self._flush(need)
        return True

    # -- recovery ----------------------------------------------------------------------------------

    def recover(self) -> DirtyMap:
        """Every region that may hold a write that reached one member but not another.

        Raises InvalidLogError if the log was lost or invalid when opened (full merge needed).
        """
        if not self.valid:
            raise InvalidLogError(f"{self.path}: the write-intent log was lost or invalid")
        m = DirtyMap(self.size, self.grain)
        for r in self._marked():
            m.mark(r * self.region, self.region)
        return m

    def _marked(self) -> list[int]:
        """Marked region numbers (a torn last page may set bits past the volume: dropped)."""
        with self._lock:
            return self._marked_unlocked()

    def _marked_unlocked(self) -> list[int]:
        bits = bytes(self._bits)
        found = [
            i * 8 + bit
            for i, byte in enumerate(bits)
            if byte
            for bit in range(8)
            if byte >> bit & 1
        ]
        return [r for r in found if r < self.nregions]

    def dirty_regions(self) -> int:
        return len(self._marked())

    def close(self) -> None:
        """Stop the cleaner and close; every region whose writes have all ended is cleared on
        the way, without waiting for `idle_delay` (that delay only spares a busy region churn),
        so a clean stop is not taken for a crash at the next start. A region with a write in
        flight stays, and so does every region if clearing fails (logged): that is safe."""
        if self._closed:
            return
        self._stop.set()
        if self._cleaner is not None:
            self._cleaner.join()
        try:
            self.flush_idle(math.inf)
        except Exception as e:
            log.warning("%s: idle regions kept at close: %s", self.path, e)
        finally:
            self._closed = True
            self._io.close()

    def __enter__(self) -> WriteIntentLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
