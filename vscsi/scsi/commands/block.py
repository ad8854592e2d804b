"""SBC-3 commands: capacity, READ/WRITE, VERIFY, WRITE SAME, UNMAP, COMPARE AND WRITE, ..."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vscsi.scsi import cdb as C
from vscsi.scsi import sense
from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.commands.primary import reply
from vscsi.scsi.sense import SenseError
from vscsi.store.base import WriteProtectedError

if TYPE_CHECKING:
    from vscsi.scsi.lun import Lun

CHUNK = 1 << 20  # WRITE SAME pattern and VERIFY reads move in pieces of this size


def check_range(lun: Lun, lba: int, nblocks: int, length_byte: int) -> None:
    if lba + nblocks > lun.blocks:
        raise sense.lba_out_of_range()
    if nblocks > lun.max_transfer_blocks:
        raise sense.invalid_cdb(length_byte)


def check_writable(lun: Lun) -> None:
    if lun.volume.read_only:
        raise WriteProtectedError(lun.volume.name)


def data_out(buf: DataBuffer, nbytes: int) -> list[memoryview]:
    """The data-out views for `nbytes`.

    Less data than the CDB implies is refused, never half-written: the mismatch lies in the
    transport's command IU, not in the CDB (05/0E/03, as LIO answers such a WRITE).
    """
    if buf.length < nbytes:
        raise sense.data_out_length()
    return buf.slices(0, nbytes)


def exact_data_out(buf: DataBuffer, nbytes: int) -> None:
    """For commands whose data-out is not simply their blocks (WRITE SAME's one block,
    COMPARE AND WRITE's verify and write halves) any other length, more as well as less,
    means the host meant another command: refused like a short one (05/0E/03)."""
    if buf.length != nbytes:
        raise sense.data_out_length()


# -- READ / WRITE ---------------------------------------------------------------------------


def _read(lun: Lun, buf: DataBuffer, lba: int, n: int, length_byte: int) -> int:
    check_range(lun, lba, n, length_byte)
    bs = lun.block_size
    nbytes = min(n * bs, buf.length - buf.length % bs)
    if nbytes:
        lun.volume.readinto(lba * bs, buf.slices(0, nbytes))
    return nbytes


def _write(lun: Lun, buf: DataBuffer, lba: int, n: int, fua: bool, length_byte: int) -> int:
    check_range(lun, lba, n, length_byte)
    check_writable(lun)
    if n:
        bs = lun.block_size
        views = data_out(buf, n * bs)
        with lun.ranges.hold(lba * bs, n * bs):
            lun.volume.write(lba * bs, views, fua)
    return 0


def _rw6(cdb: bytes) -> tuple[int, int]:
    """(LBA, blocks) of READ/WRITE(6): a TRANSFER LENGTH of 0 means 256 blocks."""
    p = C.Rw6.parse(cdb)
    return p.b1.lba_hi << 16 | p.lba_lo, p.length or 256


def read6(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    lba, n = _rw6(cdb)
    return _read(lun, buf, lba, n, 4)


def write6(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    lba, n = _rw6(cdb)
    return _write(lun, buf, lba, n, False, 4)


def read10(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    _, _, lba, n = C.RW10.unpack_from(cdb)
    return _read(lun, buf, lba, n, 7)


def write10(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    _, flags, lba, n = C.RW10.unpack_from(cdb)
    return _write(lun, buf, lba, n, bool(flags & 0x08), 7)


def read12(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.Rw12.parse(cdb)
    return _read(lun, buf, p.lba, p.length, 6)


def write12(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.Rw12.parse(cdb)
    return _write(lun, buf, p.lba, p.length, p.b1.fua, 6)


def read16(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    _, _, lba, n = C.RW16.unpack_from(cdb)
    return _read(lun, buf, lba, n, 10)


def write16(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    _, flags, lba, n = C.RW16.unpack_from(cdb)
    return _write(lun, buf, lba, n, bool(flags & 0x08), 10)


# -- VERIFY / WRITE AND VERIFY ----------------------------------------------------------------


def _medium(lun: Lun, lba: int, n: int) -> bytes:
    bs = lun.block_size
    out = bytearray(n * bs)
    for start in range(0, len(out), CHUNK):
        view = memoryview(out)[start : start + CHUNK]
        lun.volume.readinto(lba * bs + start, [view])
    return bytes(out)


def _miscompare(offset: int) -> SenseError:
    return SenseError(sense.MISCOMPARE, sense.MISCOMPARE_DURING_VERIFY, info=offset)


def _first_difference(a: bytes, b: bytes) -> int:
    lo, hi = 0, len(a)
    while hi - lo > 64:  # bisect on large slices: comparisons run at memcmp speed
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next(i for i in range(lo, hi) if a[i] != b[i])


def _verify(lun: Lun, buf: DataBuffer, lba: int, n: int, bytchk: int, length_byte: int) -> int:
    check_range(lun, lba, n, length_byte)
    if n == 0:
        return 0
    bs = lun.block_size
    medium = _medium(lun, lba, n)
    if bytchk == 0:
        return 0
    if bytchk == 1:
        expected = b"".join(bytes(v) for v in data_out(buf, n * bs))
    elif bytchk == 3:
        expected = b"".join(bytes(v) for v in data_out(buf, bs)) * n
    else:
        raise sense.invalid_cdb(1, 2)
    if medium != expected:
        raise _miscompare(_first_difference(medium, expected))
    return 0


def verify10(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.Verify10.parse(cdb)
    return _verify(lun, buf, p.lba, p.length, p.b1.bytchk, 7)


def verify16(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.Verify16.parse(cdb)
    return _verify(lun, buf, p.lba, p.length, p.b1.bytchk, 10)


def _write_and_verify(lun: Lun, buf: DataBuffer, lba: int, n: int, bytchk: bool, lb: int) -> int:
    _write(lun, buf, lba, n, True, lb)
    if n and bytchk:
        written = b"".join(bytes(v) for v in buf.slices(0, n * lun.block_size))
        medium = _medium(lun, lba, n)
        if medium != written:
            raise _miscompare(_first_difference(medium, written))
    return 0


def write_verify10(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.Rw10.parse(cdb)
    return _write_and_verify(lun, buf, p.lba, p.length, p.b1.b1_bit1, 7)


def write_verify16(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.Rw16.parse(cdb)
    return _write_and_verify(lun, buf, p.lba, p.length, p.b1.b1_bit1, 10)


# -- SYNCHRONIZE CACHE ---------------------------------------------------------------------


def sync10(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.SyncCache10.parse(cdb)
    if p.lba + p.length > lun.blocks:
        raise sense.lba_out_of_range()
    lun.volume.flush()
    return 0


def sync16(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.SyncCache16.parse(cdb)
    if p.lba + p.length > lun.blocks:
        raise sense.lba_out_of_range()
    lun.volume.flush()
    return 0


# -- WRITE SAME / UNMAP ----------------------------------------------------------------------


def _write_same(lun: Lun, buf: DataBuffer, lba: int, n: int, flags: Any, lb: int) -> int:
    """ANCHOR, PBDATA and LBDATA are outside the usage data, so the LUN has refused them.

    SBC-4 WRITE SAME: the device server transfers "a single logical block from the Data-Out
    Buffer" (none with NDOB); more blocks than MAXIMUM WRITE SAME LENGTH are an INVALID FIELD
    IN CDB (Block Limits VPD page, transfer limits for commands).
    """
    if lba >= lun.blocks:
        raise sense.lba_out_of_range()
    if n == 0:  # SBC-3 with WSNZ=0: through the last LBA
        n = lun.blocks - lba
    if lba + n > lun.blocks:
        raise sense.lba_out_of_range()
    if n > lun.vpd.max_write_same_blocks():
        raise sense.invalid_cdb(lb)
    bs = lun.block_size
    exact_data_out(buf, 0 if flags.ndob else bs)
    check_writable(lun)
    block = bytes(bs) if flags.ndob else buf.gather(bs)
    with lun.ranges.hold(lba * bs, n * bs):
        if flags.unmap and lun.volume.supports_unmap and not any(block):
            _deallocate(lun, lba * bs, n * bs)
        else:
            _fill(lun, lba * bs, n * bs, block)
    return 0


def _fill(lun: Lun, offset: int, length: int, block: bytes) -> None:
    chunk = block * max(CHUNK // len(block), 1)
    done = 0
    while done < length:
        piece = memoryview(chunk)[: min(len(chunk), length - done)]
        lun.volume.write(offset + done, [piece])
        done += len(piece)


def _deallocate(lun: Lun, offset: int, length: int) -> None:
    """Unmap whole granules and zero the partial ones at the edges (we report LBPRZ=1)."""
    gran = lun.vpd.unmap_granularity() * lun.block_size
    start = -(-offset // gran) * gran
    end = (offset + length) // gran * gran
    if start >= end:
        _fill(lun, offset, length, bytes(lun.block_size))
        return
    if start > offset:
        _fill(lun, offset, start - offset, bytes(lun.block_size))
    lun.volume.unmap(start, end - start)
    if offset + length > end:
        _fill(lun, end, offset + length - end, bytes(lun.block_size))


def write_same10(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.WriteSame10.parse(cdb)
    return _write_same(lun, buf, p.lba, p.length, p.b1, 7)


def write_same16(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.WriteSame16.parse(cdb)
    return _write_same(lun, buf, p.lba, p.length, p.b1, 10)


def unmap(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    """UNMAP (SBC-3 §5.28): every descriptor is validated before any block is deallocated."""
    if not lun.volume.supports_unmap:  # LBPU=0: the command does not exist here
        raise SenseError(sense.ILLEGAL_REQUEST, sense.INVALID_COMMAND_OPERATION_CODE)
    p = C.Unmap.parse(cdb)
    if p.param_len == 0:
        return 0
    if p.param_len < 8 or buf.length < p.param_len:
        raise sense.parameter_list_length()
    data = buf.gather(p.param_len)
    head = C.UnmapHeader.parse(data)
    count = min(head.desc_len, len(data) - 8) // 16  # a partial last descriptor is ignored
    if count > lun.vpd.max_unmap_descriptors():
        raise sense.invalid_param(2)
    extents = [C.UnmapDescriptor.parse(data[8 + 16 * i : 24 + 16 * i]) for i in range(count)]
    total = 0
    for i, d in enumerate(extents):
        if d.lba + d.nblocks > lun.blocks:
            raise sense.lba_out_of_range()
        total += d.nblocks
        if total > lun.vpd.max_unmap_blocks():
            raise sense.invalid_param(8 + 16 * i + 8)
    check_writable(lun)
    bs = lun.block_size
    for d in extents:
        if d.nblocks:
            with lun.ranges.hold(d.lba * bs, d.nblocks * bs):
                _deallocate(lun, d.lba * bs, d.nblocks * bs)
    return 0


# -- COMPARE AND WRITE ----------------------------------------------------------------------


def compare_and_write(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    """Compare the first half of the data-out with the medium; if equal write the second."""
    return _compare_and_write(lun, cdb, buf, replayed=False)


def compare_and_write_replayed(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    """The same command served again after a daemon restart: its write may have landed
    (wholly, or torn by the kill) before the old daemon died, and comparing our own write data
    against the verify data would report a miscompare the host never caused."""
    return _compare_and_write(lun, cdb, buf, replayed=True)


def _landed(medium: bytes, verify: bytes, new: bytes, bs: int) -> bool:
    """Every block holds either its verify data or its write data: this command's write,
    complete or torn. Only a replayed command may take that for its own."""
    return all(
        medium[i : i + bs] in (verify[i : i + bs], new[i : i + bs])
        for i in range(0, len(medium), bs)
    )


def _compare_and_write(lun: Lun, cdb: bytes, buf: DataBuffer, replayed: bool) -> int:
    """More blocks than MAXIMUM COMPARE AND WRITE LENGTH are an INVALID FIELD IN CDB (SBC-4
    Block Limits VPD page); the data-out holds exactly the verify and the write data, n
    blocks each, so any other length would split them where the host did not."""
    p = C.CompareAndWrite.parse(cdb)
    n = p.nblocks
    if n > lun.vpd.max_compare_and_write_blocks():
        raise sense.invalid_cdb(13)
    check_range(lun, p.lba, n, 13)
    bs = lun.block_size
    exact_data_out(buf, 2 * n * bs)
    if n == 0:  # SBC-3: not an error, nothing compared or written
        return 0
    check_writable(lun)
    data = buf.gather(2 * n * bs)
    verify, new = data[: n * bs], data[n * bs :]
    with lun.ranges.hold(p.lba * bs, n * bs):  # atomic against every write to these blocks
        medium = _medium(lun, p.lba, n)
        if medium != verify and not (replayed and _landed(medium, verify, new, bs)):
            raise _miscompare(_first_difference(medium, verify))
        lun.volume.write(p.lba * bs, [memoryview(new)], p.b1.fua)
    return 0


# -- capacity and provisioning -----------------------------------------------------------------


def read_capacity10(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.ReadCapacity10.parse(cdb)
    if p.lba and not p.b8.pmi:
        raise sense.invalid_cdb(2)
    last = min(lun.blocks - 1, 0xFFFFFFFF)
    return reply(buf, last.to_bytes(4, "big") + lun.block_size.to_bytes(4, "big"), 8)


def read_capacity16(lun: Lun, p: Any, buf: DataBuffer) -> int:
    if p.lba and not p.b14 & 0x01:  # PMI=0 requires LBA 0
        raise sense.invalid_cdb(2)
    data = bytearray(32)
    data[0:8] = (lun.blocks - 1).to_bytes(8, "big")
    data[8:12] = lun.block_size.to_bytes(4, "big")
    # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: the 4 KiB allocation unit of the backstores,
    # so initiators align I/O and UNMAP to what really gets deallocated
    data[13] = lun.vpd.unmap_granularity().bit_length() - 1
    if lun.volume.supports_unmap:
        data[14] = 0xC0  # LBPME, LBPRZ
    return reply(buf, bytes(data), p.alloc_len)


MAPPED, DEALLOCATED = 0, 1  # PROVISIONING STATUS of an LBA status descriptor
MAX_DESCRIPTOR_BLOCKS = 0xFFFFFFFF  # a 4-byte NUMBER OF LOGICAL BLOCKS field


def _status_run(lun: Lun, first: int) -> tuple[int, int]:
    """(blocks, provisioning status) of the run that starts at block `first`.

    A block is deallocated only if all of it is: a hole that ends inside a block (a file
    system block smaller than ours) leaves that block mapped, since it holds data.
    """
    bs = lun.block_size
    e = lun.volume.extent_at(first * bs)
    end = min(e.offset + e.length, lun.volume.size)
    last = -(-end // bs) if e.mapped else end // bs
    if last <= first:
        return 1, MAPPED
    return min(last - first, MAX_DESCRIPTOR_BLOCKS), MAPPED if e.mapped else DEALLOCATED


def get_lba_status(lun: Lun, p: Any, buf: DataBuffer) -> int:
    """SBC-4 LBA status descriptor relationships: the first descriptor starts at the STARTING
    LOGICAL BLOCK ADDRESS and each next one where the previous ended, whatever extents the
    volume reports."""
    lba, alloc = p.lba, p.alloc_len
    if lba >= lun.blocks:
        raise sense.lba_out_of_range()
    room = min(max((alloc - 8) // 16, 1), 64)
    descs = bytearray()
    while lba < lun.blocks and len(descs) < 16 * room:
        n, status = _status_run(lun, lba)
        descs += lba.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes([status, 0, 0, 0])
        lba += n
    header = (len(descs) + 4).to_bytes(4, "big") + bytes(4)
    return reply(buf, header + bytes(descs), alloc)


def service_action_in(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    """SERVICE ACTION IN(16): the LUN has already refused service actions not in cdb.py."""
    p = C.ServiceActionIn16.parse(cdb)
    return _SERVICE_ACTIONS_IN[p.b1.service_action](lun, p, buf)


_SERVICE_ACTIONS_IN = {0x10: read_capacity16, 0x12: get_lba_status}
