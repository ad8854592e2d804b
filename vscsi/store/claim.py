"""Open a backing store so that nothing but the named store is opened, and claim it.

A daemon runs as root and opens paths from a config or from the control socket, so a path is
resolved one component at a time from `/` with O_NOFOLLOW: a symbolic link is followed only when
the caller allows it (`follow_symlinks = true`) or when it is root's (the link owned by root and
every directory on the way owned by root and not writable by group or others, like
/dev/disk/by-id). Nothing is resolved twice, so a link swapped in after the check is never
followed. Missing parent directories are created 0700 when the store is to be created.

The store is then claimed for as long as the descriptor is open, as md and LVM claim devices: a
block device is opened O_EXCL (refused while mounted or held by md, LVM, dm or another
exclusive opener), a regular file is flock()ed LOCK_EX and refused while it backs a loop device.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import stat

from vscsi.store.base import StoreConfigError

MAX_LINKS = 40  # as the kernel's path walk
LOOP_BACKING = "/sys/block/loop*/loop/backing_file"


class MissingStoreError(StoreConfigError):
    """The store does not exist and was not to be created."""


def store_key(path: str) -> tuple[str, int, int] | None:
    """What identifies a store whatever path names it (hard links, device node aliases)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev, 0)
    return ("file", st.st_dev, st.st_ino)


def _root_only(st: os.stat_result) -> bool:
    return st.st_uid == 0 and not st.st_mode & 0o022


class _Walk:
    """One resolution of an absolute path, holding O_PATH descriptors of the directories."""

    def __init__(self, path: str, follow_symlinks: bool, make_dirs: bool) -> None:
        self.path = path
        self.follow = follow_symlinks
        self.make_dirs = make_dirs
        self.links = 0
        self.dir = -1
        self.trusted = True
        self.parts = [p for p in path.split("/") if p]
        self._enter_root()

    def _enter_root(self) -> None:
        self._set_dir(os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        self.trusted = _root_only(os.fstat(self.dir))

    def _set_dir(self, fd: int) -> None:
        if self.dir >= 0:
            os.close(self.dir)
        self.dir = fd

    def close(self) -> None:
        self._set_dir(-1)

    def resolve(self) -> tuple[int, str]:
        """Walk every component but the last; return (directory fd, last name)."""
        parts = self.parts
        while len(parts) > 1 or (parts and parts[0] in (".", "..")):
            name = parts.pop(0)
            if name == ".":
                continue
            fd = self._lookup(name, directory=True)
            if fd is None:  # a symlink: its target goes in front of what is left
                parts = self.splice(name, parts)
                continue
            self._set_dir(fd)
            self.trusted = self.trusted and _root_only(os.fstat(fd))
        if not parts:
            raise StoreConfigError(f"{self.path} is a directory")
        self.parts = parts
        return self.dir, parts[0]

    def _lookup(self, name: str, directory: bool) -> int | None:
        """O_PATH descriptor of `name` in the current directory; None when it is a symlink."""
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir)
        except FileNotFoundError:
            if not (directory and self.make_dirs):
                raise MissingStoreError(f"{self.path} does not exist") from None
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=self.dir)
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir)
        mode = os.fstat(fd).st_mode
        if stat.S_ISLNK(mode):
            self.check_link(fd, name)
            os.close(fd)
            return None
        if directory and not stat.S_ISDIR(mode):
            os.close(fd)
            raise StoreConfigError(f"{self.path}: {name} is not a directory")
        return fd

    def check_link(self, fd: int, name: str) -> None:
        """Refuse a symlink the config did not allow and root did not make."""
        self.links += 1
        if self.links > MAX_LINKS:
            raise StoreConfigError(f"{self.path}: too many levels of symbolic links")
        if self.follow or (self.trusted and os.fstat(fd).st_uid == 0):
            return
        raise StoreConfigError(
            f"{self.path}: {name} is a symbolic link not owned by root in root-only "
            "directories (name its target, or set follow_symlinks = true)"
        )

    def splice(self, name: str, rest: list[str]) -> list[str]:
        """The components of link `name`'s target (from `/` when absolute), then `rest`."""
        target = os.readlink(name, dir_fd=self.dir)
        if target.startswith("/"):
            self._enter_root()
        return [p for p in target.split("/") if p] + rest


def open_store(
    path: str, writable: bool, *, create: bool = False, follow_symlinks: bool = False
) -> tuple[int, bool]:
    """Open and claim the file or block device at absolute `path`: (fd, created).

    Raises StoreConfigError (one line naming the path) when it cannot be opened as allowed or
    is in use elsewhere; MissingStoreError when it does not exist and `create` is false.
    """
    walk = _Walk(os.path.abspath(path), follow_symlinks, make_dirs=create)
    try:
        return _open_last(walk, writable, create)
    except OSError as e:
        raise StoreConfigError(f"{path}: {e.strerror}") from None
    finally:
        walk.close()


def _open_last(walk: _Walk, writable: bool, create: bool) -> tuple[int, bool]:
    access = os.O_RDWR if writable else os.O_RDONLY
    while True:
        parent, name = walk.resolve()
        try:
            pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise MissingStoreError(f"{walk.path} does not exist") from None
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=parent)
            return _claim(fd, walk.path), True
        st = os.fstat(pfd)
        if not stat.S_ISLNK(st.st_mode):
            break
        try:
            walk.check_link(pfd, name)
        finally:
            os.close(pfd)
        walk.parts = walk.splice(name, [])
    try:
        return _reopen(pfd, st, walk.path, access), False
    finally:
        os.close(pfd)


def _reopen(pfd: int, st: os.stat_result, path: str, access: int) -> int:
    """Open the very inode found (through /proc/self/fd, never by name again) and claim it."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise StoreConfigError(f"{path} is neither a regular file nor a block device")
    exclusive = os.O_EXCL if stat.S_ISBLK(st.st_mode) else 0
    try:
        fd = os.open(f"/proc/self/fd/{pfd}", access | exclusive | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise StoreConfigError(
                f"{path} is in use by another process (mounted, or held by md, LVM, "
                "device-mapper or another vscsi daemon)"
            ) from None
        raise
    return fd if exclusive else _claim(fd, path)


def _claim(fd: int, path: str) -> int:
    """flock a regular file for the life of `fd`; refuse one a loop device reads from."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        loop = backing_loop(os.fstat(fd))
        if loop:
            raise StoreConfigError(f"{path} backs {loop} (detach it with losetup -d first)")
    except BlockingIOError:
        os.close(fd)
        raise StoreConfigError(
            f"{path} is held by another process (another vscsi daemon, or a second volume)"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def backing_loop(st: os.stat_result) -> str | None:
    """The loop device whose backing file is this inode, if any."""
    for attr in glob.glob(LOOP_BACKING):
        try:
            with open(attr) as f:
                name = f.read().rstrip("\n").removesuffix(" (deleted)")
            other = os.stat(name)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return "/dev/" + attr.split("/")[-3]
    return None
