"""Build hook: compiles the C extensions with cffi (API mode, out of line): the dirty-block
tracker and the TCMU ring's ordered mailbox accesses."""

from setuptools import setup

setup(cffi_modules=["vscsi/tracker/_build.py:ffibuilder", "vscsi/tcmu/_build.py:ffibuilder"])
