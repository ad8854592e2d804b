"""Build hook: compiles the C extensions with cffi (API mode, out of line): the dirty-block
tracker and the TCMU ring's ordered mailbox accesses (builders in vscsi/_build.py)."""

from setuptools import setup

setup(cffi_modules=["vscsi/_build.py:tracker", "vscsi/_build.py:ring"])
