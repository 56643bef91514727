"""setuptools shim: cffi_modules is not expressible in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["tpb/build.py:ffibuilder"])
