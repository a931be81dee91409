"""Build script for onecycle-fused.

Install (torch-extension convention, against the torch you already have):

    pip install --no-build-isolation -e .

Build flags (environment variables) are documented here as they are added by
the compiled-kernels work; with none set this installs the pure-Python
package (reference and Triton backends).
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["onecycle_fused", "onecycle_fused.*"]),
)
