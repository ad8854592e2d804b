"""The TCMU shared-memory ABI (include/uapi/linux/target_core_user.h), declared once.

The hot path uses `struct.Struct`s compiled from these declarations' sizes and offsets; a unit
test checks that both read the same bytes the same way.
"""

from __future__ import annotations

import struct

from construct import Array, Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct, this

MAILBOX_VERSION = 2
FLAG_CAP_OOOC = 1 << 0
FLAG_CAP_READ_LEN = 1 << 1
FLAG_CAP_TMR = 1 << 2
FLAG_CAP_KEEP_BUF = 1 << 3

OP_PAD = 0
OP_CMD = 1
OP_TMR = 2
OP_MASK = 0x7

UFLAG_UNKNOWN_OP = 0x1
UFLAG_READ_LEN = 0x2
UFLAG_KEEP_BUF = 0x4

SENSE_BUFFERSIZE = 96
ENTRY_ALIGN = 8

TMR_UNKNOWN = 0
TMR_ABORT_TASK = 1
TMR_ABORT_TASK_SET = 2
TMR_CLEAR_ACA = 3
TMR_CLEAR_TASK_SET = 4
TMR_LUN_RESET = 5
TMR_TARGET_WARM_RESET = 6
TMR_TARGET_COLD_RESET = 7
TMR_LUN_RESET_PRO = 128

Mailbox = Struct(
    "version" / Int16ul,
    "flags" / Int16ul,
    "cmdr_off" / Int32ul,
    "cmdr_size" / Int32ul,
    "cmd_head" / Int32ul,
    Padding(48),  # cmd_tail sits on its own cache line (ALIGN_SIZE 64)
    "cmd_tail" / Int32ul,
)
MAILBOX_TAIL_OFFSET = 64

EntryHeader = Struct(
    "len_op" / Int32ul,
    "cmd_id" / Int16ul,
    "kflags" / Int8ul,
    "uflags" / Int8ul,
)

Iovec = Struct("base" / Int64ul, "len" / Int64ul)

# The request struct inside the entry's union is not packed: cdb_off is 8-byte aligned.
CmdRequest = Struct(
    "hdr" / EntryHeader,
    "iov_cnt" / Int32ul,
    "iov_bidi_cnt" / Int32ul,
    "iov_dif_cnt" / Int32ul,
    Padding(4),
    "cdb_off" / Int64ul,
    Padding(16),
    "iov" / Array(this.iov_cnt + this.iov_bidi_cnt + this.iov_dif_cnt, Iovec),
)
CMD_IOV_OFFSET = 48

CmdResponse = Struct(
    "hdr" / EntryHeader,
    "scsi_status" / Int8ul,
    Padding(3),
    "read_len" / Int32ul,
    "sense" / Bytes(SENSE_BUFFERSIZE),
)

# Every CMD entry is at least this long, so the response always fits in place.
CMD_ENTRY_MIN = CmdResponse.sizeof()


def cmd_base_size(iovs: int) -> int:
    """Where the kernel puts a CMD entry's CDB (from the entry's start): after its `iovs`
    iovecs, but never inside the response (tcmu_cmd_get_base_cmd_size)."""
    return max(CMD_IOV_OFFSET + Iovec.sizeof() * iovs, CMD_ENTRY_MIN)


TmrEntry = Struct(
    "hdr" / EntryHeader,
    "tmr_type" / Int8ul,
    Padding(3),
    "cmd_cnt" / Int32ul,
    Padding(16),
    "cmd_ids" / Array(this.cmd_cnt, Int16ul),
)
TMR_IDS_OFFSET = 32

# Fast-path views of the same layouts (checked against the declarations in tests).
HEADER = struct.Struct("<IHBB")
CMD_COUNTS = struct.Struct("<III4xQ")  # iov_cnt, iov_bidi_cnt, iov_dif_cnt, cdb_off @8
IOVEC = struct.Struct("<QQ")
RESPONSE = struct.Struct("<B3xI")  # scsi_status, read_len @8
MAILBOX_HEAD = struct.Struct("<HHIII")  # version, flags, cmdr_off, cmdr_size, cmd_head
U32 = struct.Struct("<I")
