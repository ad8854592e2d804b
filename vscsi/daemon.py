"""`vscsi up`: serve every configured volume through TCMU until told to stop.

Start-up validates everything first (config, backing stores, the control socket) and creates
configfs objects only then. A backstore left by a daemon that died (SIGKILL, crash) is
re-attached rather than recreated, so the host keeps its /dev/sdX and the commands that were
queued in the ring meanwhile are served. SIGTERM/SIGINT remove exactly what this daemon made.

Exit status: 0 after SIGTERM/SIGINT; 1 when it cannot start (2 for a config error, from the
CLI); 3 (`RingFailure`) when a device's ring stopped serving — a corrupt ring, a failed uio
doorbell or an unexpected error in a ring thread. Host I/O to that volume would only time out,
so the daemon stops every ring, closes the stores and exits, but leaves the backstores and
exports in configfs like a SIGKILL would: run it under a supervisor (systemd `Restart=on-failure`)
and the restarted daemon re-attaches, the host keeps its /dev/sdX and the queued commands are
served (replayed ones idempotently, see vscsi.tcmu.ring).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from vscsi.config import (
    Config,
    ConfigError,
    HostGroupConfig,
    ShadowSetConfig,
    VolumeConfig,
    open_volumes,
)
from vscsi.control import Command, ControlError, ControlServer
from vscsi.durable.committer import Committer
from vscsi.hostgroup import lio
from vscsi.hostgroup import manager as hostgroup
from vscsi.hostgroup.plan import PlanError, plan, wanted
from vscsi.pair.manager import PairManager
from vscsi.pair.states import NoSuchPair, PairError
from vscsi.remote.peer import LinkDown
from vscsi.remote.states import Fence
from vscsi.scsi import sense
from vscsi.scsi.lun import Lun
from vscsi.shadow.assemble import Assembly
from vscsi.shadow.set import ShadowSet
from vscsi.shadow.states import ShadowError
from vscsi.store.base import Volume
from vscsi.store.claim import store_key
from vscsi.store.file import StoreConfigError
from vscsi.tcmu import configfs, libtcmu
from vscsi.tcmu.netlink import NetlinkError, NetlinkListener, resolve_family
from vscsi.tcmu.uio import UioDevice, UioError

if TYPE_CHECKING:
    from vscsi.link.peer import LinkPeer
    from vscsi.link.session import LinkServer, LinkSession

log = logging.getLogger("vscsi")
PLAIN_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# -- pair operations as the control socket runs them: local or remote by the pair's kind -------


def _create(m: PairManager, r: dict[str, Any]) -> None:
    if ":" in r["svol"]:
        if "mu" in r:
            raise PairError("a remote pair has no MU#: leave out --mu")
        try:
            fence = Fence(r.get("fence", "never"))
        except ValueError:
            raise PairError(f"fence {r['fence']!r} must be data, status or never") from None
        m.remote.create(r["name"], r["pvol"], r["svol"], fence)
        return
    if "fence" in r or "mu" not in r:
        raise PairError("a local pair needs --mu and has no fence (a remote S-VOL is REMOTE:VOL)")
    m.create(r["name"], r["pvol"], r["svol"], r["mu"])


def _split(m: PairManager, r: dict[str, Any]) -> None:
    if r["name"] in m.remote.pairs:
        m.remote.split(r["name"], rw=r.get("rw", False), force_ssws=r.get("rs", False))
    elif r.get("rw") or r.get("rs"):
        raise PairError(f"--rw and -RS are for remote pairs; {r['name']!r} is local")
    else:
        m.split(r["name"], r.get("read_only", False))


def _resync(m: PairManager, r: dict[str, Any]) -> None:
    if r["name"] in m.remote.pairs:
        m.remote.resync(r["name"], swaps=r.get("swaps", False))
    elif r.get("swaps"):
        raise PairError(f"--swaps is for remote pairs; {r['name']!r} is local")
    else:
        m.resync(r["name"])


def _delete(m: PairManager, r: dict[str, Any]) -> None:
    if r["name"] in m.remote.pairs:
        m.remote.delete(r["name"])
    else:
        m.delete(r["name"])


def _takeover(m: PairManager, r: dict[str, Any]) -> dict[str, Any]:
    action = m.remote.takeover(r["name"])
    return {"action": action.name.lower(), "exit": action.value}


class DaemonError(Exception):
    """The daemon cannot start or serve; the message is one line for the operator."""

    exit_status = 1


class RingFailure(DaemonError):
    """A ring stopped serving: exit so that a supervisor restarts us (configfs left in place)."""

    exit_status = 3


@dataclass
class Served:
    """One volume and everything that serves it."""

    cfg: VolumeConfig | ShadowSetConfig
    volume: Volume
    lun: Lun
    backstore: configfs.Backstore | None = None
    export: configfs.LoopExport | None = None
    device: UioDevice | libtcmu.LibtcmuDevice | None = None
    thread: threading.Thread | None = None
    sd: str | None = None
    sg: str | None = None
    state: str = "starting"
    reattached: bool = False
    replies: bool = False  # the kernel waits for our netlink replies about its backstore
    stats: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        ident = self.cfg.identity
        commands, compiled = self.device.counts() if self.device else (0, 0)
        return {
            "name": self.cfg.name,
            "path": self.cfg.path,
            "state": self.state,
            "size": self.volume.size,
            "block_size": self.volume.block_size,
            "write_cache": self.volume.write_cache,
            "export": "+".join(self.cfg.export) or "none",
            "vendor": ident.vendor,
            "product": ident.product,
            "serial": ident.serial,
            "volume_id": ident.volume_id,
            "port": ident.port,
            "unit_serial": ident.unit_serial,
            "uio": self.device.name if self.device else None,
            "sd": self.sd,
            "sg": self.sg,
            "reattached": self.reattached,
            "commands": commands,
            "compiled": compiled,
        }

    def inquiry_changed(self) -> None:
        """The pair state changed: INQUIRY DATA HAS CHANGED for the host's next command (Linux
        logs it and sends a uevent with SDEV_UA=INQUIRY_DATA_HAS_CHANGED for udev rules)."""
        self.lun.add_unit_attention(*sense.INQUIRY_DATA_HAS_CHANGED)


class Daemon:
    """Owns the served volumes, the netlink listener and the control socket."""

    def __init__(self, config: Config, verbose: int = 0, force_mount: Sequence[str] = ()) -> None:
        self.config = config
        self.verbose = verbose
        self.force_mount = set(force_mount)  # shadow sets to mount below their recorded generation
        self.served: dict[str, Served] = {}
        self._stop = threading.Event()
        self._rings_stop = threading.Event()  # set only once the exports are gone
        self._netlink: NetlinkListener | None = None
        self._libtcmu: libtcmu.Context | None = None  # transport = "libtcmu"
        self._control: ControlServer | None = None
        self.pairs: PairManager | None = None
        self._sessions: list[LinkSession] = []  # to each peer array (remote pairs)
        self._link_server: LinkServer | None = None
        self.shadow_sets: dict[str, tuple[Assembly, ShadowSet]] = {}
        self.hostgroups: hostgroup.HostGroups | None = None
        self._iscsi_owner = lio.owner_of(config.state_dir)  # marks this daemon's iSCSI targets
        self._state_lock: IO[str] | None = None
        self._keep_kernel_objects = False  # after a RingFailure: the restart re-attaches

    # -- life cycle -------------------------------------------------------------------------------

    def run(self) -> None:
        self._setup_logging()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            self._announce()
            while not self._stop.wait(0.5):
                self._check_threads()
        finally:
            self.stop()
            for s, h in previous.items():
                signal.signal(s, h)

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        self._stop.set()

    def _setup_logging(self) -> None:
        """Rich on a terminal; one plain line per record elsewhere (a journal, a file, CI),
        where rich would wrap every line at 80 columns."""
        level = logging.WARNING - 10 * min(self.verbose + 1, 2)
        if sys.stderr.isatty():
            from rich.logging import RichHandler  # only on a terminal: importing rich is slow

            handler: logging.Handler = RichHandler(show_path=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
        else:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(PLAIN_LOG_FORMAT))
        logging.basicConfig(level=level, handlers=[handler])

    def open(self) -> None:
        """Backing stores, shadow sets, pair state and LUNs: everything below the kernel."""
        volumes: dict[str, Volume] = dict(open_volumes(self.config))  # every store, or none
        try:
            self._lock_state_dir()  # after the config's own errors, which come first
            committer = Committer.at(self.config.state_dir)
            for sc in self.config.shadow_sets:
                assembly = Assembly(sc, self.config.state_dir, committer, self.config.copy_rate)
                shadow = assembly.open(force=sc.name in self.force_mount)
                self.shadow_sets[sc.name] = (assembly, shadow)
                volumes[sc.name] = shadow
            link = self.config.link
            self.pairs = PairManager(
                self.config.state_dir,
                volumes,
                {u.name: u.identity for u in self._units()},
                on_change=self._pair_changed,
                copy_rate=self.config.copy_rate,
                committer=committer,
                serial=link.serial if link is not None else 0,
                peers=self._start_links(),
            )
            self._serve_link(self.pairs)
            self.hostgroups = hostgroup.HostGroups(self.config, committer, self._apply_host_groups)
        except hostgroup.HostGroupError as e:
            self._stop_links()
            for vol in volumes.values():
                vol.close()
            raise DaemonError(str(e)) from None
        except (PairError, OSError, ValueError, DaemonError) as e:
            self._stop_links()
            for vol in volumes.values():
                vol.close()
            if isinstance(e, ConfigError | DaemonError):
                raise
            raise DaemonError(f"pair state in {self.config.state_dir}: {e}") from None
        for u in self._units():
            vol = self.pairs.volume(u.name)
            lun = Lun(vol, u.identity, vendor_pages=self.pairs.vendor_pages(u.name))
            self.served[u.name] = Served(u, vol, lun)

    # -- the link to peer arrays (remote pairs) --------------------------------------------------

    def _start_links(self) -> dict[str, LinkPeer]:
        """One session per `[[remote]]`, connecting in the background."""
        link = self.config.link
        if link is None:
            return {}
        from vscsi.link.peer import LinkPeer  # the sessions: only with peers, before they start
        from vscsi.link.session import LinkSession

        for r in self.config.remotes:
            session = LinkSession(link, r)
            session.start()
            self._sessions.append(session)
        for session in self._sessions:  # before pair recovery starts copies over them
            session.wait_connected(min(link.timeout, 5.0))
        return {s.remote.name: LinkPeer(s, s.remote) for s in self._sessions}

    def _serve_link(self, pairs: PairManager) -> None:
        """Accept the peers' update copies and control messages; then, before any LUN is
        served, settle every remote pair with its peer (a P-VOL whose peer is unreachable is
        fenced) and keep exchanging state in the background."""
        link = self.config.link
        if link is None:
            return
        if link.listen is not None:
            from vscsi.link.session import LinkServer

            server = LinkServer(
                link,
                self.config.remotes,
                lambda peer, volume: pairs.remote.replica_target(volume, peer.serial),
                lambda peer, body: pairs.remote.handle(str(body.get("op")), body, peer.serial),
            )
            server.start()
            self._link_server = server
        for session in self._sessions:
            session.wait_connected(min(link.timeout, 5.0))
        pairs.remote.check_peers()
        pairs.remote.watch(link.timeout)

    def _stop_links(self) -> None:
        if self._link_server is not None:
            self._link_server.close()
            self._link_server = None
        for session in self._sessions:
            session.close()
        self._sessions.clear()

    def _units(self) -> list[VolumeConfig | ShadowSetConfig]:
        return [*self.config.volumes, *self.config.shadow_sets]

    def _lock_state_dir(self) -> None:
        """One daemon per state directory: two would both recover and copy the same pairs."""
        try:
            os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
            self._state_lock = open(os.path.join(self.config.state_dir, "lock"), "a")  # noqa: SIM115
        except OSError as e:
            raise DaemonError(f"state dir {self.config.state_dir}: {e.strerror}") from None
        try:
            fcntl.flock(self._state_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._state_lock.close()
            raise DaemonError(
                f"state dir {self.config.state_dir} is in use by another vscsi daemon "
                "(stop it first)"
            ) from None

    def start(self) -> None:
        lib = None
        if self.config.transport == "libtcmu":
            try:
                lib = libtcmu.load()  # before anything is opened: nothing to undo
            except libtcmu.LibtcmuError as e:
                raise DaemonError(str(e)) from None
        self.open()
        self._control = ControlServer(
            self.config.socket, self.handlers(), group=self.config.socket_group
        )
        try:
            self._control.start()
        except (ControlError, OSError) as e:
            self._control = None
            raise DaemonError(str(e)) from None
        try:
            configfs.prepare_kernel()
        except configfs.ConfigfsError as e:
            raise DaemonError(str(e)) from None
        self._netlink = NetlinkListener(self._on_added, self._on_removed, self._on_reconfig)
        self._netlink.start()
        if lib is None:
            for s in self.served.values():
                self._serve(s)
        else:
            self._serve_libtcmu(lib)
        self._await_disks()
        self._start_iscsi()

    # -- iSCSI ports and host groups ------------------------------------------------------------

    def _start_iscsi(self) -> None:
        """Once every backstore exists: the ports' targets as the host groups say (leftovers
        of ports no longer configured go)."""
        try:
            if self.config.ports:
                lio.prepare()
            if self.hostgroups is not None:
                self.hostgroups.start()
        except (configfs.ConfigfsError, PlanError) as e:
            raise DaemonError(f"iSCSI: {e}") from None

    def _apply_host_groups(self, groups: list[HostGroupConfig]) -> None:
        owner = self._iscsi_owner
        lio.apply(plan(wanted(self.config.ports, groups), lio.observe(owner)), owner)

    def _serve(self, s: Served) -> None:
        """The native transport: backstore, our own ring on its uio device, export."""
        try:
            self._backstore(s)
            assert s.backstore is not None
            s.device = UioDevice.open(s.backstore.uio_name)
            self._run_ring(s)
        except (configfs.ConfigfsError, UioError) as e:
            s.state = "failed"
            raise DaemonError(f"volume {s.cfg.name}: {e}") from None

    def _serve_libtcmu(self, lib: Any) -> None:
        """The libtcmu transport: every backstore first, then one tcmulib context finds them
        all (see vscsi.tcmu.libtcmu for why discovery is its start-up scan and netlink ours),
        then each ring is served and exported."""
        uios = {}
        for s in self.served.values():
            try:
                self._backstore(s)
                assert s.backstore is not None
                uios[s.cfg.name] = s.backstore.uio_name
            except (configfs.ConfigfsError, UioError) as e:
                s.state = "failed"
                raise DaemonError(f"volume {s.cfg.name}: {e}") from None
        try:
            self._libtcmu = libtcmu.Context(lib, resolve_family()[1])
            devices = self._libtcmu.attach(uios)
        except (libtcmu.LibtcmuError, NetlinkError, UioError) as e:
            self._libtcmu = None
            raise DaemonError(str(e)) from None
        for s in self.served.values():
            s.device = devices[s.cfg.name]
            try:
                self._run_ring(s)
            except configfs.ConfigfsError as e:
                s.state = "failed"
                raise DaemonError(f"volume {s.cfg.name}: {e}") from None

    def _backstore(self, s: Served) -> None:
        """Re-attach the backstore an earlier daemon left, or make it."""
        existing = configfs.find_backstore(s.cfg.name)
        if existing is not None:
            configfs.check_backstore(existing, s.volume.size, s.volume.block_size)
            s.backstore, s.reattached = existing, True
            s.replies = not configfs.opt_out_of_replies(existing)
        else:
            s.backstore = configfs.create_backstore(
                s.cfg.name, s.volume.size, s.volume.block_size, self.config.command_timeout
            )

    def _run_ring(self, s: Served) -> None:
        """Serve the attached device in a thread, then export the backstore."""
        assert s.device is not None and s.backstore is not None
        native = {"fast": self.config.fast_path} if self.config.transport == "native" else {}
        s.thread = threading.Thread(
            target=s.device.serve,
            args=(s.lun, self._rings_stop, self.config.io_workers),
            kwargs=native,
            name=f"ring-{s.cfg.name}",
            daemon=True,
        )
        s.thread.start()
        if "loop" in s.cfg.export:
            s.export = configfs.find_export(s.backstore) or configfs.export_loop(s.backstore)

    def _await_disks(self) -> None:
        """Every volume serving, each exported one once the host has its /dev/sdX. Waited for
        after the last export, not after each: the kernel probes a new disk on its own
        (READ CAPACITY, the VPD pages… each through that LUN's ring) and udev names it, so
        the disks of a config come up side by side while the next LUNs are exported."""
        for s in self.served.values():
            if s.export is not None:
                try:
                    s.sd, s.sg = configfs.find_disk(s.export, timeout=60)
                except configfs.ConfigfsError as e:
                    s.state = "failed"
                    raise DaemonError(f"volume {s.cfg.name}: {e}") from None
            s.state = "serving"

    def _announce(self) -> None:
        for s in self.served.values():
            how = "re-attached" if s.reattached else "serving"
            where = [f"{s.sd} {s.sg}"] if s.sd else []
            where += ["iSCSI"] if "iscsi" in s.cfg.export else []
            print(
                f"{s.cfg.name}: {' and '.join(where) or '(not exported)'} {how} on "
                f"{s.device.name if s.device else '-'} "
                f"({s.cfg.path}, {s.volume.size} bytes)",
                flush=True,
            )
        print(
            f"vscsi: serving {len(self.served)} volume(s) through the {self.config.transport} "
            f"transport; control socket {self.config.socket}; Ctrl-C to stop",
            flush=True,
        )

    def _check_threads(self) -> None:
        """A ring thread ends only when stopped or broken: broken, the whole daemon ends."""
        for s in self.served.values():
            if s.state == "serving" and s.thread is not None and not s.thread.is_alive():
                s.state = "failed"
                self._keep_kernel_objects = True
                uio = s.device.name if s.device else "-"
                why = (s.device.error if s.device else None) or "ring thread ended"
                raise RingFailure(
                    f"volume {s.cfg.name}: ring on {uio} stopped: {why}; exiting "
                    f"(status {RingFailure.exit_status}) for a restart to re-attach"
                )

    def stop(self) -> None:
        """Tear down in reverse: exports (the host may still flush through the rings), then
        ring threads, backstores, netlink, socket, files."""
        self._stop.set()
        if self.config.ports and not self._keep_kernel_objects:
            with contextlib.suppress(configfs.ConfigfsError):
                lio.remove_ours(self._iscsi_owner)  # before the backstores its LUNs hold
        served = list(reversed(self.served.values()))
        for s in served:
            with contextlib.suppress(configfs.ConfigfsError):
                if s.export is not None and not self._keep_kernel_objects:
                    configfs.remove_export(s.export)
        self._rings_stop.set()
        for s in served:
            self._stop_ring(s)
        running = any(s.thread is not None and s.thread.is_alive() for s in served)
        if self._libtcmu is not None and not self._keep_kernel_objects and not running:
            self._libtcmu.close()  # it unmaps the rings: only once no thread can touch them
        for s in served:
            self._unserve(s)
        if self._netlink is not None:
            self._netlink.stop()
        if self._control is not None:
            self._control.close()
        self._stop_links()
        if self.pairs is not None:
            self.pairs.close()  # copiers stop at a checkpoint; every volume is closed
        if self._state_lock is not None:
            self._state_lock.close()

    def _stop_ring(self, s: Served) -> None:
        if s.device is not None:
            s.device.wake()
        if s.thread is not None:
            s.thread.join(10)

    def _unserve(self, s: Served) -> None:
        if s.device is not None:
            s.device.close()
        with contextlib.suppress(configfs.ConfigfsError):
            if s.backstore is not None and not self._keep_kernel_objects:
                configfs.remove_backstore(s.backstore)
        s.state = "stopped"

    # -- netlink and control ----------------------------------------------------------------------

    def _owner(self, device_name: str) -> Served | None:
        """The volume of a TCMU device name `tcm-user/<hba>/<dev>/vscsi/<volume>`."""
        return self.served.get(device_name.rsplit("/", 1)[-1])

    # The netlink callbacks: None sends no reply. A backstore this daemon creates tells the
    # kernel to wait for none (configfs.create_backstore), one it re-attached is told so when
    # it can be; only a backstore the kernel still waits on (`Served.replies`) gets answers.

    def _on_added(self, name: str, minor: int, dev_id: int) -> int | None:
        return None  # only our own creations, which wait for no reply

    def _on_removed(self, name: str, minor: int, dev_id: int) -> int | None:
        s = self._owner(name)
        return 0 if s is not None and s.replies else None

    def _on_reconfig(self, name: str, minor: int, dev_id: int, **changes: Any) -> int | None:
        s = self._owner(name)
        if s is None:
            return None  # another vscsi daemon's: it answers
        if "write_cache" in changes:
            s.volume.write_cache = bool(changes["write_cache"])
        resized = "size" in changes and changes["size"] != s.volume.size
        if resized:
            log.error("%s: dev_size changed in configfs; still serving %d bytes", s.cfg.name,
                      s.volume.size)  # fmt: skip
        if not s.replies:
            return None
        return -22 if resized else 0  # -EINVAL: resizing a served volume is not supported

    def _ours(self, name: str) -> bool:
        return self._owner(name) is not None

    def _status(self, _req: dict[str, Any]) -> dict[str, Any]:
        volumes = []
        for s in self.served.values():
            d = s.describe()
            if self.pairs is not None:
                d["role"] = self.pairs.display_volume(s.cfg.name)["role"]
            volumes.append(d)
        links = [{"remote": x.remote.name, "serial": x.remote.serial, "up": x.connected}
                 for x in self._sessions]  # fmt: skip
        return {"pid": os.getpid(), "config": self.config.source, "volumes": volumes,
                "links": links, "ports": self._ports_status()}  # fmt: skip

    def _ports_status(self) -> list[dict[str, Any]]:
        if self.hostgroups is None or not self.config.ports:
            return []
        try:
            sessions = lio.sessions(self._iscsi_owner)
        except configfs.ConfigfsError as e:
            log.warning("%s", e)
            sessions = []
        return self.hostgroups.status(sessions)

    # -- pairs ------------------------------------------------------------------------------------

    def _pair_changed(self, volume: str) -> None:
        s = self.served.get(volume)
        if s is not None:
            s.inquiry_changed()

    def handlers(self) -> dict[str, Command]:
        """Every control command with its arguments; read-only ones are open to socket_group."""
        pair_ops: dict[str, tuple[Callable[[PairManager, dict[str, Any]], Any], dict[str, type]]]
        pair_ops = {
            "pair_restore": (lambda m, r: m.restore(r["name"]), {}),
            "pair_delete": (_delete, {}),
        }  # fmt: skip
        cmds = {
            "status": Command(self._status, read_only=True),
            "pair_display": Command(self._pair_handler(self._pair_display),
                                    optional={"name": str}, read_only=True),
            "pair_create": Command(self._pair_handler(_create),
                                   {"name": str, "pvol": str, "svol": str},
                                   {"mu": int, "fence": str}),
            "pair_split": Command(self._pair_handler(_split), {"name": str},
                                  {"read_only": bool, "rw": bool, "rs": bool}),
            "pair_resync": Command(self._pair_handler(_resync), {"name": str}, {"swaps": bool}),
            "takeover": Command(self._pair_handler(_takeover), {"name": str}),
            "shadow_show": Command(self._shadow_handler(self._shadow_show),
                                   optional={"name": str}, read_only=True),
            "shadow_add": Command(self._shadow_handler(self._shadow_add),
                                  {"name": str, "member": str}),
            "shadow_remove": Command(self._shadow_handler(self._shadow_remove),
                                     {"name": str, "member": str}, {"minicopy": bool}),
        }  # fmt: skip
        for cmd, (op, args) in pair_ops.items():
            cmds[cmd] = Command(self._pair_handler(op), {"name": str, **args})
        if self.hostgroups is not None:
            cmds |= hostgroup.commands(self.hostgroups, (configfs.ConfigfsError, PlanError))
        return cmds

    # -- shadow sets ----------------------------------------------------------------------------

    @staticmethod
    def _shadow_handler(op: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        def handle(req: dict[str, Any]) -> Any:
            try:
                return op(req)
            except ShadowError as e:
                raise ControlError(str(e)) from None

        return handle

    def _shadow(self, name: str) -> tuple[Assembly, ShadowSet]:
        try:
            return self.shadow_sets[name]
        except KeyError:
            known = ", ".join(self.shadow_sets) or "none configured"
            raise ShadowError(f"no shadow set {name!r} (known: {known})") from None

    def _shadow_show(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        names = [req["name"]] if req.get("name") else list(self.shadow_sets)
        return [self._shadow(n)[1].show() for n in names]

    def _shadow_add(self, req: dict[str, Any]) -> dict[str, Any]:
        """Mount a member: only a path the config allows, that no other volume or set uses and
        that nothing else holds (see `_addable`); a removed member's open volume is reused."""
        assembly, shadow = self._shadow(req["name"])
        path = self._addable(assembly, req["member"])
        try:
            member, reused = assembly.member(path)
        except StoreConfigError as e:
            raise ShadowError(str(e)) from None
        try:
            shadow.add(member)
        except BaseException:
            if not reused:
                member.close()
            raise
        assembly.remember(member.name)
        return shadow.show()

    def _addable(self, assembly: Assembly, member: str) -> str:
        """The member's path, or ShadowError when `vscsi shadow add` may not open it."""
        if not member.startswith("/"):
            raise ShadowError(f"{member}: give an absolute path")
        path = os.path.normpath(member)
        known = path in assembly.cfg.members or path in assembly.added()
        if not known and not any(path.startswith(d) for d in self.config.shadow_add_paths):
            allowed = " ".join(self.config.shadow_add_paths) or "none"
            raise ShadowError(
                f"{path} is not a member of {assembly.cfg.label} and not under "
                f"daemon.shadow_add_paths ({allowed}); add its directory there first"
            )
        key = store_key(path)
        for unit, store in self._stores():
            if unit is not assembly.cfg and key is not None and store_key(store) == key:
                raise ShadowError(f"{path} is already the store of {unit.label}")
        return path

    def _stores(self) -> list[tuple[VolumeConfig | ShadowSetConfig, str]]:
        """Every store this daemon serves: volumes, and shadow members in the config or added."""
        stores: list[tuple[VolumeConfig | ShadowSetConfig, str]]
        stores = [(v, v.path) for v in self.config.volumes]
        for assembly, _ in self.shadow_sets.values():
            stores += [(assembly.cfg, p) for p in [*assembly.cfg.members, *assembly.added()]]
        return stores

    def _shadow_remove(self, req: dict[str, Any]) -> dict[str, Any]:
        _, shadow = self._shadow(req["name"])
        shadow.remove(os.path.abspath(req["member"]), minicopy=req.get("minicopy", False))
        return shadow.show()

    def _pair_handler(
        self, op: Callable[[PairManager, dict[str, Any]], Any]
    ) -> Callable[[dict[str, Any]], Any]:
        def handle(req: dict[str, Any]) -> Any:
            if self.pairs is None:
                raise ControlError("the daemon is still starting")
            try:
                return op(self.pairs, req)
            except PairError as e:
                raise ControlError(str(e), getattr(e, "exit_status", 1)) from None
            except LinkDown as e:
                raise ControlError(f"{e} (the remote array is not reachable)", 242) from None

        return handle

    @staticmethod
    def _pair_display(m: PairManager, req: dict[str, Any]) -> dict[str, Any]:
        """Pairs by pair name, or every pair of a volume; with no name, every pair and every
        volume (a simplex volume may carry a note, e.g. content undefined after a delete)."""
        name = req.get("name")
        if name is None:
            volumes = [m.display_volume(v) for v in m.volumes]
            return {"pairs": m.display(), "volumes": volumes}
        if name in m.pairs or name in m.remote.pairs:
            return {"pairs": m.display(name), "volumes": []}
        if name not in m.volumes:
            raise NoSuchPair(f"no pair or volume {name!r}: see 'vscsi pair display'")
        vol = m.display_volume(name)
        return {"pairs": vol["pairs"], "volumes": [vol]}
