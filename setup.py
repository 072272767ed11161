"""The one compiled part of dgm: the sparse DCT codec's kernel, built by `pip install -e .` (pyproject.toml has
everything else). Portable flags only (baseline x86-64 SSE2, no -march=native); -ffp-contract=off keeps float
results equal to numpy's elementwise ones on targets with fused multiply-add.

On CPython 3.11+ the kernel is built against the stable ABI (`_dct_kernel.abi3.so`): one build runs on every later
CPython, so a tree built here runs unchanged on a cluster or GPU image whose Python is newer."""

import sys
from glob import glob

from setuptools import Extension, setup

KERNEL_DIR = "data_pipeline/codecs"
STABLE_ABI = sys.version_info >= (3, 11)  # the buffer protocol joined the limited API in 3.11

setup(
    ext_modules=[
        Extension(
            "data_pipeline.codecs._dct_kernel",
            sources=sorted(glob(f"{KERNEL_DIR}/*.c")),
            depends=[f"{KERNEL_DIR}/dct_kernel.h"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-strict-aliasing"],
            define_macros=[("Py_LIMITED_API", "0x030B0000")] if STABLE_ABI else [],
            py_limited_api=STABLE_ABI,
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp311"}} if STABLE_ABI else {},
)
