"""The libtcmu 1.5.4 structs declared in vscsi.tcmu.libtcmu, checked two ways: sizes and offsets
against numbers derived from the v1.5.4 headers (x86_64, LP64; lines cited), and against the
library itself — libtcmu functions that read or write fields of a struct we allocate.

Headers: open-iscsi/tcmu-runner tag v1.5.4 (06d64ab78c28), libtcmu.h, libtcmu_common.h,
libtcmu_priv.h; the functions are in libtcmu.c and api.c of the same tag.
"""

from __future__ import annotations

import ctypes
from ctypes import addressof, byref, c_size_t, c_uint32, c_uint64, c_void_p, sizeof

import pytest

from tests.unit.test_tcmu_ring import rw
from vscsi.tcmu import abi
from vscsi.tcmu.libtcmu import (
    LIBRARY,
    STS_PASSTHROUGH_ERR,
    Iovec,
    LibtcmuError,
    TcmuDevice,
    TcmulibCfgInfo,
    TcmulibCmd,
    TcmulibHandler,
    load,
)
from vscsi.tcmu.loopback import LoopbackKernel

try:
    load()
except LibtcmuError:
    pytestmark = pytest.mark.skip(reason="libtcmu2 is not installed")


@pytest.fixture(scope="module")
def raw() -> ctypes.CDLL:
    """A second handle with our own prototypes: functions that return field addresses."""
    lib = ctypes.CDLL(LIBRARY)
    for name in ("tcmu_dev_get_uio_name", "tcmu_dev_get_cfgstring", "tcmu_dev_get_private"):
        getattr(lib, name).restype = c_void_p
    return lib


def offsets(struct: type[ctypes.Structure]) -> dict[str, int]:
    return {name: getattr(struct, name).offset for name, *_ in struct._fields_}


def test_tcmulib_cmd_matches_the_header() -> None:
    # libtcmu_common.h:99-106: u16 cmd_id; u8 *cdb; struct iovec *iovec; size_t iov_cnt;
    # u8 sense_buf[SENSE_BUFFERSIZE=96 (line 67)]; void *hm_private
    assert offsets(TcmulibCmd) == {
        "cmd_id": 0, "cdb": 8, "iovec": 16, "iov_cnt": 24, "sense_buf": 32, "hm_private": 128,
    }  # fmt: skip
    assert sizeof(TcmulibCmd) == 136
    assert (sizeof(Iovec), Iovec.iov_len.offset) == (16, 8)  # sys/uio.h


def test_tcmulib_handler_matches_the_header() -> None:
    # libtcmu.h:42-75: three const char *, the context, five function pointers, two void *
    names = [
        "name", "subtype", "cfg_desc", "ctx", "check_config", "reconfig", "update_logdir",
        "added", "removed", "hm_private", "connection",
    ]  # fmt: skip
    assert offsets(TcmulibHandler) == {n: 8 * i for i, n in enumerate(names)}
    assert sizeof(TcmulibHandler) == 88


def test_tcmulib_cfg_info_matches_the_header() -> None:
    # libtcmu.h:32-40: enum type; union { uint64_t; char *; bool } data (8-byte aligned)
    assert offsets(TcmulibCfgInfo) == {"type": 0, "data": 8}
    assert sizeof(TcmulibCfgInfo) == 16


def test_tcmu_device_matches_the_private_header() -> None:
    # libtcmu_priv.h:38-68, PATH_MAX 4096. The three `unsigned int :1` fields (lines 55-57) use
    # bits of byte 72 and GCC starts the char arrays right after them, at 73, not at 76
    o = offsets(TcmuDevice)
    assert (o["fd"], o["map"], o["map_len"], o["cmd_tail"], o["num_lbas"]) == (0, 8, 16, 24, 32)
    assert (o["block_size"], o["split_unmaps"], o["unmap_gran_align"]) == (40, 56, 68)
    assert (o["write_cache_enabled"], o["unmap_enabled"]) == (72, 72)
    assert (o["dev_name"], o["tcm_hba_name"], o["tcm_dev_name"], o["cfgstring"]) == (
        73, 89, 105, 233,
    )  # fmt: skip
    assert (o["handler"], o["ctx"], o["hm_private"], sizeof(TcmuDevice)) == (
        4336, 4344, 4352, 4360,
    )  # fmt: skip


def test_the_library_reads_and_writes_tcmu_device_where_we_declared_it(raw: ctypes.CDLL) -> None:
    dev = TcmuDevice(fd=77, dev_name=b"uio5", cfgstring=b"vscsi/v0")
    p = byref(dev)
    base = addressof(dev)
    assert raw.tcmu_dev_get_fd(p) == 77
    assert raw.tcmu_dev_get_uio_name(p) == base + TcmuDevice.dev_name.offset
    assert raw.tcmu_dev_get_cfgstring(p) == base + TcmuDevice.cfgstring.offset
    raw.tcmu_dev_set_private(p, c_void_p(0x1234))
    assert dev.hm_private == 0x1234 == raw.tcmu_dev_get_private(p)
    raw.tcmu_dev_set_block_size(p, c_uint32(4096))
    assert (dev.block_size, dev.block_size_shift) == (4096, 12)
    raw.tcmu_dev_set_num_lbas(p, c_uint64(1 << 40))
    raw.tcmu_dev_set_max_xfer_len(p, c_uint32(11))
    raw.tcmu_dev_set_opt_unmap_gran(p, c_uint32(13), True)
    raw.tcmu_dev_set_unmap_gran_align(p, c_uint32(17))
    assert (dev.num_lbas, dev.max_xfer_len, dev.opt_unmap_gran, dev.split_unmaps) == (
        1 << 40, 11, 13, True,
    )  # fmt: skip
    assert dev.unmap_gran_align == 17 and dev.max_unmap_len == 0
    raw.tcmu_dev_set_unmap_enabled(p, True)
    assert (dev.write_cache_enabled, dev.solid_state_media, dev.unmap_enabled) == (0, 0, 1)
    raw.tcmu_dev_set_write_cache_enabled(p, True)
    assert dev.write_cache_enabled == 1


def test_the_library_seeks_tcmulib_cmd_iovecs_where_we_declared_them() -> None:
    seek = ctypes.CDLL(LIBRARY).tcmu_cmd_seek
    seek.argtypes = [ctypes.POINTER(TcmulibCmd), c_size_t]
    length = ctypes.CDLL(LIBRARY).tcmu_iovec_length
    length.argtypes, length.restype = [ctypes.POINTER(Iovec), c_size_t], c_size_t
    iovs = (Iovec * 3)((0x1000, 512), (0x2000, 512), (0x3000, 1024))
    cmd = TcmulibCmd(iovec=iovs, iov_cnt=3)
    assert length(iovs, 3) == 2048
    seek(byref(cmd), 600)  # consumes the first iovec, 88 bytes of the second
    assert cmd.iov_cnt == 2
    assert (iovs[0].iov_len, iovs[1].iov_base, iovs[1].iov_len) == (0, 0x2000 + 88, 424)


def test_the_library_fetches_and_completes_commands_in_our_structs() -> None:
    """The real tcmulib_get_next_command / tcmulib_command_complete on a loopback ring: what
    they fill in and read back lands where our declarations say."""
    lib = load()
    k = LoopbackKernel(flags=abi.FLAG_CAP_OOOC)
    base = addressof(ctypes.c_char.from_buffer(k.mem))
    dev = TcmuDevice(fd=-1, map=base, map_len=len(k.mem), dev_name=b"uio0")
    cdb = rw(0x28, 3, 8)
    first = k.submit(cdb, data_in_len=4096)
    second = k.submit(bytes([0x12, 0, 0, 0, 96, 0]), data_in_len=96)
    c1 = lib.tcmulib_get_next_command(byref(dev), 0)
    c2 = lib.tcmulib_get_next_command(byref(dev), 16)
    assert not lib.tcmulib_get_next_command(byref(dev), 0)
    assert dev.cmd_tail == k.head  # its private fetch position, which the transport reads
    one, two = c1.contents, c2.contents
    assert (one.cmd_id, two.cmd_id) == (first, second)
    assert ctypes.string_at(one.cdb, 10) == cdb
    assert one.iov_cnt == 1 and one.iovec[0].iov_len == 4096
    assert one.iovec[0].iov_base >= base + k.data_off
    assert ctypes.cast(two.cdb, c_void_p).value + 6 == two.hm_private  # behind the 6-byte CDB
    sense = bytes(range(1, 97))
    two.sense_buf[:] = sense
    lib.tcmulib_command_complete(byref(dev), c2, STS_PASSTHROUGH_ERR)  # out of order
    lib.tcmulib_command_complete(byref(dev), c1, 0)
    done = {c.cmd_id: c for c in k.reap()}
    assert (done[second].status, done[second].sense) == (2, sense)
    assert done[first].status == 0
