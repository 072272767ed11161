"""The one compiled part of dgm: the sparse DCT codec's kernel, built by `pip install -e .` (pyproject.toml has
everything else). Portable flags only (baseline x86-64 SSE2, no -march=native); -ffp-contract=off keeps float
results equal to numpy's elementwise ones on targets with fused multiply-add."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "data_pipeline.codecs._dct_kernel",
            sources=["data_pipeline/codecs/_dct_kernel.c"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-strict-aliasing"],
        )
    ]
)
