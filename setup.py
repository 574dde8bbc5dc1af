"""Packaging entry point. Metadata lives in pyproject.toml; the native extension (fastavg._C) will be
built here by torch.utils.cpp_extension when its sources land (csrc/)."""

from setuptools import setup

setup()
