"""cffi builder for the ring's ordered mailbox accesses (API mode, out of line).

setuptools runs it through ``cffi_modules`` so ``pip install .`` compiles the extension; running
this file directly builds it in place for a source checkout.
"""

import os
import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "csrc" / "ring.h"


def _cdef() -> str:
    """The header minus comments and preprocessor lines, which cffi's parser does not take."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "vscsi.tcmu._ring_c",
    '#include "ring.h"',
    sources=["csrc/ring.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=".", verbose=False)
    for obj in ("vscsi/tcmu/_ring_c.o", "csrc/ring.o"):  # keep the tree clean
        Path(obj).unlink(missing_ok=True)
