"""`vscsi inq`: what a host sees of a vscsi volume's pair state (VPD 0xC0), like `inqraid`.

It reads through SG_IO, as failover software and udev would, so it shows what the LUN really
serves rather than what the daemon believes. Output forms are described in docs/inq.md.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, NoReturn

import click
from construct import ConstructError, Container

from vscsi.host import sgio
from vscsi.pair.states import Role, Status
from vscsi.pair.vpd import (
    FLAG_FENCED,
    FLAG_SPLIT_READ_ONLY,
    FORMAT_VERSION,
    PAGE_CODE,
    parse_page,
)
from vscsi.scsi.sense import ILLEGAL_REQUEST

STD_INQUIRY_LEN = 36  # vendor, product and revision end here; every device accepts 36
SUPPORTED_PAGES = 0x00
COPYING = (Status.COPY.value, Status.RCPY.value)
UDEV_UNSAFE = re.compile(r"[^A-Za-z0-9+.:@_-]")


def probe(path: str) -> dict[str, Any]:
    """One device's identity and pair page; a failure becomes `"error"`, never an exception."""
    try:
        with sgio.device(path) as fd:
            return {"device": path, **_identify(fd)}
    except sgio.SgIoError as e:
        return {"device": path, "error": str(e)}


def _identify(fd: int) -> dict[str, Any]:
    info = _standard(sgio.inquiry(fd, alloc=STD_INQUIRY_LEN))
    pages = _supported_pages(fd)
    page = _pair_page(fd) if PAGE_CODE in pages else None
    info.update(vscsi=page is not None, vpd_pages=pages)
    if page is not None:
        info.update(_pair(page.body))
    return info


def _standard(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise sgio.SgIoError(f"INQUIRY: short response ({len(data)} bytes)")
    return {
        "peripheral_type": data[0] & 0x1F,
        "vendor": _text(data[8:16]),
        "product": _text(data[16:32]),
        "revision": _text(data[32:36]),
    }


def _text(field: bytes) -> str:
    return field.decode("ascii", "replace").rstrip(" \0")


def _supported_pages(fd: int) -> list[int]:
    """VPD 0x00; a device without VPD support refuses it, which just means "not ours"."""
    try:
        data = sgio.inquiry(fd, SUPPORTED_PAGES)
    except sgio.CheckCondition as e:
        if e.sense is not None and e.sense.key == ILLEGAL_REQUEST:
            return []
        raise
    return list(data[4 : 4 + int.from_bytes(data[2:4], "big")])


def _pair_page(fd: int) -> Container | None:
    """Our page, or None when another vendor's 0xC0 (or a future format) is there."""
    data = sgio.inquiry(fd, PAGE_CODE)
    if len(data) < 5 or data[4] != FORMAT_VERSION:
        return None
    try:
        return parse_page(data)
    except ConstructError:
        return None


def _pair(body: Container) -> dict[str, Any]:
    return {
        "version": body.version,
        "serial": body.serial,
        "volume_id": body.volume_id,
        "ldev": f"{body.volume_id:04X}",
        "port": body.port,
        "remote": _slot(body.slots[0]),
        "mu": [_slot(s) for s in body.slots[1:]],
    }


def _slot(slot: Container) -> dict[str, Any]:
    return {
        "kind": "remote" if slot.kind == 0 else "local",
        "mu": slot.mu,
        "role": slot.role.value,
        "status": slot.status.value,
        "progress": slot.progress,
        "flags": slot.flags,
        "split_read_only": bool(slot.flags & FLAG_SPLIT_READ_ONLY),
        "fenced": bool(slot.flags & FLAG_FENCED),
        "partner_serial": slot.partner_serial,
        "partner_volume_id": slot.partner_volume_id,
        "generation": slot.generation,
    }


def _slots(info: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every slot with its inqraid label: HORC (remote), then MU#0..MU#2."""
    return [("HORC", info["remote"]), *((f"MU#{i}", s) for i, s in enumerate(info["mu"]))]


def render_line(info: dict[str, Any]) -> str:
    """inqraid's one line; paired slots' statuses follow in STATUS[...] (see docs/inq.md)."""
    dev = info["device"]
    if "error" in info:
        return f"{dev} -> error: {info['error']}"
    ident = f"[{info['vendor']:<8}] [{info['product']:<16}]"
    if not info["vscsi"]:
        return f"{dev} -> not a vscsi volume {ident}"
    mus = " ".join(f"MU#{i} = {s['role']}" for i, s in enumerate(info["mu"]))
    line = (
        f"{dev} -> [vscsi] {info['port']} Ser = {info['serial']} LDEV = 0x{info['ldev']} "
        f"{ident} HORC = {info['remote']['role']} HOMRCF[{mus}]"
    )
    paired = [f"{label} = {_status(s)}" for label, s in _slots(info) if s["role"] != "SMPL"]
    return f"{line} STATUS[{' '.join(paired)}]" if paired else line


def _status(slot: dict[str, Any]) -> str:
    return f"{slot['status']} {slot['progress']}%" if slot["status"] in COPYING else slot["status"]


def overall_role(info: dict[str, Any]) -> str:
    """The volume's role for naming: S-VOL wins (it is read-only to the host), then P-VOL."""
    roles = {s["role"] for _, s in _slots(info)}
    for role in (Role.SVOL, Role.PVOL):
        if role.value in roles:
            return role.value
    return Role.SMPL.value


def render_export(info: dict[str, Any]) -> list[str]:
    """KEY=value lines for udev's IMPORT{program}; values stripped of anything udev-unsafe."""
    values: dict[str, Any] = {
        "SERIAL": info["serial"],
        "VOLUME_ID": info["volume_id"],
        "LDEV": info["ldev"],
        "PORT": info["port"],
        "ROLE": overall_role(info),
        "HORC": info["remote"]["role"],
    }
    for i, slot in enumerate(info["mu"]):
        values[f"MU{i}_ROLE"] = slot["role"]
        values[f"MU{i}_STATUS"] = slot["status"]
    values["GENERATION"] = max(s["generation"] for _, s in _slots(info))
    return [f"VSCSI_{key}={UDEV_UNSAFE.sub('_', str(value))}" for key, value in values.items()]


def _fail(message: str, code: int) -> NoReturn:
    """One line on stderr, as `vscsi` reports every user error."""
    click.echo(f"vscsi: {message}", err=True)
    sys.exit(code)


@click.command()
@click.argument("devices", nargs=-1, required=True, metavar="DEVICE...")
@click.option("--json", "as_json", is_flag=True, help="A JSON list, one object per device.")
@click.option(
    "--export", is_flag=True, help="KEY=value lines for a udev IMPORT{program} rule (one device)."
)
def inq(devices: tuple[str, ...], as_json: bool, export: bool) -> None:
    """Show the pair state each DEVICE (/dev/sdX, /dev/sgN) serves in VPD page 0xC0."""
    if as_json and export:
        _fail("--json and --export exclude each other", 2)
    if export:
        _export(devices)
        return
    infos = [probe(d) for d in devices]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
    else:
        for info in infos:
            click.echo(render_line(info))
    if any("error" in i for i in infos):
        sys.exit(1)


def _export(devices: tuple[str, ...]) -> None:
    """udev runs this per device: nothing printed means no properties and so no link."""
    if len(devices) != 1:
        _fail(f"--export takes exactly one device, got {len(devices)}", 2)
    info = probe(devices[0])
    if "error" in info:
        _fail(f"{info['device']}: {info['error']}", 1)
    if info["vscsi"]:
        click.echo("\n".join(render_export(info)))
