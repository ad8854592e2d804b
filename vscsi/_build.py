"""cffi builders for the C extensions (API mode, out of line): the dirty-block tracker and the
TCMU ring's ordered mailbox accesses and compiled READ/WRITE path.

setuptools runs ``tracker`` and ``ring`` through ``cffi_modules`` so ``pip install .`` compiles
the extensions; running this file directly builds both in place for a source checkout. Each
extension is its ``SOURCES`` in ``csrc/`` behind ``csrc/NAME.h``, whose declarations are its cdef.
"""

import os
import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"tracker": "vscsi.tracker._tracker_c", "ring": "vscsi.tcmu._ring_c"}
SOURCES = {"tracker": ["tracker.c"], "ring": ["ring.c", "fastpath.c"]}


def _cdef(header: Path) -> str:
    """The header minus comments and preprocessor lines, which cffi's parser does not take."""
    text = re.sub(r"/\*.*?\*/", "", header.read_text(), flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _ffi(name: str) -> FFI:
    ffi = FFI()
    ffi.cdef(_cdef(ROOT / "csrc" / f"{name}.h"))
    ffi.set_source(
        MODULES[name],
        f'#include "{name}.h"',
        sources=[f"csrc/{src}" for src in SOURCES[name]],
        include_dirs=["csrc"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
    )
    return ffi


def tracker() -> FFI:
    return _ffi("tracker")


def ring() -> FFI:
    return _ffi("ring")


if __name__ == "__main__":
    os.chdir(ROOT)
    for name, module in MODULES.items():
        _ffi(name).compile(tmpdir=".", verbose=False)
        objects = [module.replace(".", "/") + ".o"] + [f"csrc/{s[:-2]}.o" for s in SOURCES[name]]
        for obj in objects:  # keep the tree clean
            Path(obj).unlink(missing_ok=True)
