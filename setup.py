"""The one compiled part of dgm: the sparse DCT codec's kernel, built by `pip install -e .` (pyproject.toml has
everything else). Portable flags only (baseline x86-64 SSE2, no -march=native); -ffp-contract=off keeps float
results equal to numpy's elementwise ones on targets with fused multiply-add."""

from glob import glob

from setuptools import Extension, setup

KERNEL_DIR = "data_pipeline/codecs"

setup(
    ext_modules=[
        Extension(
            "data_pipeline.codecs._dct_kernel",
            sources=sorted(glob(f"{KERNEL_DIR}/*.c")),
            depends=[f"{KERNEL_DIR}/dct_kernel.h"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-strict-aliasing"],
        )
    ]
)
