"""Build script for onecycle-fused.

Install against the torch you already have (torch-extension convention):

    pip install --no-build-isolation -e .

What gets built:

* ``onecycle_fused._C`` (always): the op schemas and the CPU kernels
  (csrc/ops.cpp, csrc/cpu/). The CPU kernels are compiled for the
  DEFAULT, AVX2 and AVX512 instruction sets (x86-64 with GCC) and the one
  torch itself uses is picked at run time, so a wheel never assumes AVX512.
* ``onecycle_fused._C_cuda``: the CUDA kernels (csrc/cuda/*.cu), built when
  torch is a CUDA build and CUDA_HOME (nvcc) is found.

Build flags (environment variables):

    ONECYCLE_FUSED_FORCE_CUDA=1  build _C_cuda even if the checks above fail
                                 (e.g. no driver on the build machine); it
                                 still needs a CUDA build of torch to link
    ONECYCLE_FUSED_NO_CUDA=1     never build _C_cuda
    ONECYCLE_FUSED_DEBUG=1       -O0 -g instead of -O3
    TORCH_CUDA_ARCH_LIST         GPU architectures for _C_cuda, e.g. "9.0"
                                 (torch's variable; default: the visible GPUs,
                                 or torch's list when there are none)
    MAX_JOBS                     parallel compile jobs (ninja)

If a library fails to load at run time, ``import onecycle_fused`` still works
(logs once) and the optimizers fall back to another backend.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _sources(pattern: str) -> list[str]:
    # relative paths: setuptools refuses absolute ones in an editable build
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _openmp_flags(torch) -> list[str]:
    """-fopenmp where torch itself runs on OpenMP (Linux wheels, GCC).

    ATen's at::parallel_for is an inline ``#pragma omp parallel`` in an OpenMP
    build of torch: compiled without -fopenmp it silently runs on one thread.
    The library then needs libgomp.so.1, which the loader resolves to the copy
    torch has already loaded, so both share one thread pool and
    torch.set_num_threads governs our kernels too.
    """
    import platform

    if platform.system() != "Linux" or not torch.backends.openmp.is_available():
        return []
    return ["-fopenmp"]


def _extensions():
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
    import torch

    debug = _flag("ONECYCLE_FUSED_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -ffp-contract=off: the shared math rounds every operation exactly where
    # the reference does; a compiler-fused multiply-add would move results by
    # an ulp (explicit fma calls are kept).
    # No -std: torch's BuildExtension adds the standard its headers need when
    # none is given (c++17 in older torch, c++20 in newer: torch 2.14's
    # headers use C++20 and failed under a forced -std=c++17). Our sources
    # are valid in both (tools/check_cuda_compile.sh compiles the CUDA ones
    # as each).
    cxx = opt + ["-ffp-contract=off", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
    include = [os.path.join(HERE, "csrc")]
    openmp = _openmp_flags(torch)
    exts = [
        CppExtension(
            "onecycle_fused._C",
            _sources("csrc/ops.cpp") + _sources("csrc/launch_key.cpp") + _sources("csrc/cpu/kernels_default.cpp"),
            include_dirs=include,
            extra_compile_args={"cxx": cxx + openmp},
            extra_link_args=openmp,
        )
    ]

    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    if _flag("ONECYCLE_FUSED_NO_CUDA"):
        want_cuda = False
    elif _flag("ONECYCLE_FUSED_FORCE_CUDA"):
        want_cuda = True
    else:
        want_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda and cuda_sources:
        exts.append(
            CUDAExtension(
                "onecycle_fused._C_cuda",
                cuda_sources,
                include_dirs=include,
                extra_compile_args={"cxx": cxx, "nvcc": opt + ["-lineinfo"]},
            )
        )
    return exts


# CPU kernel variants: source -> the flags torch builds its kernels of that
# capability with. Compiled one by one (setuptools gives all sources of an
# extension the same flags) and linked into _C; ops.cpp picks the variant
# matching torch's own capability at run time.
CPU_CAPABILITY_FLAGS = {
    "csrc/cpu/kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu/kernels_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


# Symbols of the C++ runtime's exception machinery (libsupc++): a library
# that defines them was linked with its own static copy of libstdc++.
_OWN_RUNTIME_SYMBOLS = ("__cxa_throw", "__gxx_personality_v0")


def _warn_if_own_cxx_runtime(path: str) -> None:
    """Warn when the built library carries its own C++ runtime.

    A compiler that links libstdc++ statically (a wrapper adding it, or one
    whose library path holds only libstdc++.a: the image of this project's
    GPU machine) gives the extension its own __cxa_throw; an error our ops
    raise then crashes the process (SIGSEGV) on its way through torch's
    frames instead of reaching Python. Seen on an H100 machine; the system
    compiler there built a library whose errors raise. Linux only (nm)."""
    import shutil
    import subprocess
    import sys

    nm = shutil.which("nm")
    if nm is None or not os.path.exists(path) or sys.platform != "linux":
        return
    try:
        out = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return
    found = [name for name in _OWN_RUNTIME_SYMBOLS if any(line.split()[-1:] == [name] for line in out.splitlines())]
    if found:
        print(
            f"\nWARNING: {os.path.basename(path)} carries its own C++ runtime ({', '.join(found)} defined in it): "
            "the compiler linked libstdc++ statically. Errors raised by its ops will crash the process instead "
            "of raising in Python. Rebuild with a compiler that links libstdc++ dynamically, e.g. "
            "CC=/usr/bin/gcc CXX=/usr/bin/g++ pip install --no-build-isolation -e .\n",
            file=sys.stderr,
        )


def _cmdclass():
    import platform

    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        def build_extension(self, ext):
            if ext.name == "onecycle_fused._C" and platform.machine() in ("x86_64", "AMD64") and os.name != "nt":
                cxx = list(ext.extra_compile_args["cxx"])  # torch's defines are in by now
                for source, flags in CPU_CAPABILITY_FLAGS.items():
                    ext.extra_objects += self.compiler.compile(
                        [source], output_dir=self.build_temp, macros=ext.define_macros,
                        include_dirs=ext.include_dirs, extra_postargs=cxx + flags,
                    )
                ext.extra_compile_args["cxx"].append("-DONECYCLE_FUSED_CPU_CAPABILITIES")
            super().build_extension(ext)
            _warn_if_own_cxx_runtime(self.get_ext_fullpath(ext.name))

    return {"build_ext": Build.with_options(use_ninja=True)}


setup(
    packages=find_packages(include=["onecycle_fused", "onecycle_fused.*"]),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
