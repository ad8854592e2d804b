"""Snapshot the Python the VM runs (stdlib, the venv, this package) into one ext4 image.

The VM shares the host's root over 9p without a cache, so every stat and open of an import is
a round trip through the emulated virtio queue: `import vscsi.daemon` took about 30 s there and
each daemon or CLI start paid it again. Read from a virtio-blk disk, the same files come from
the guest's page cache after the first read. scripts/vm-run attaches the image read-only and
bind-mounts each snapshot over the path it was taken from, so every path stays the same.

Usage: vm_pyimage.py IMAGE LIST — writes IMAGE and LIST (lines of "<name> <path>").
"""

from __future__ import annotations

import compileall
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import vscsi

# Parts of the standard library nothing in the VM imports; leaving them out keeps the image small.
STDLIB_UNUSED = (
    "site-packages",
    "dist-packages",
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "config-*",
)


def snapshots() -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Name -> (path to snapshot, glob patterns to leave out)."""
    paths = sysconfig.get_paths()
    parts = {
        "stdlib": (Path(paths["stdlib"]), STDLIB_UNUSED),
        "purelib": (Path(paths["purelib"]), ()),
        "package": (Path(vscsi.__file__).parent, ()),
    }
    if paths["platlib"] != paths["purelib"]:
        parts["platlib"] = (Path(paths["platlib"]), ())
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and library and (Path(libdir) / library).is_file():
        parts["libpython"] = (Path(libdir) / library, ())
    return parts


def stage(root: Path) -> list[tuple[str, Path]]:
    mounts = []
    for name, (path, unused) in snapshots().items():
        target = root / name
        if path.is_dir():
            shutil.copytree(path, target, symlinks=True, ignore=shutil.ignore_patterns(*unused))
        else:
            shutil.copy2(path, target)
        mounts.append((name, path))
    # pyc files for this package, named by its real path so tracebacks point at the sources
    package = snapshots()["package"][0]
    compileall.compile_dir(root / "package", ddir=str(package), quiet=2)
    return mounts


def main(image: Path, listing: Path) -> None:
    with tempfile.TemporaryDirectory(dir=image.parent) as tmp:
        root = Path(tmp)
        mounts = stage(root)
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
        blocks = size // 4096 + sum(1 for _ in root.rglob("*")) + 16384
        image.unlink(missing_ok=True)
        subprocess.run(
            [
                "mke2fs",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-O",
                "^has_journal",
                "-b",
                "4096",
                "-d",
                str(root),
                str(image),
                str(blocks),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    listing.write_text("".join(f"{name} {path}\n" for name, path in mounts))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
