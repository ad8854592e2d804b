"""Build hook: compiles the C dirty-block tracker with cffi (API mode, out of line)."""

from setuptools import setup

setup(cffi_modules=["vscsi/tracker/_build.py:ffibuilder"])
