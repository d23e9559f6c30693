"""Builds the C++ CPU extension `qruntime.ops._C` (pybind11, no torch headers).

The GEMMs in csrc/cpu/gemm_impl.h are compiled once per ISA level, each object with its own -m flags
(never -march=native: the wheel must run on any x86-64 CPU); csrc/cpu/dispatch.cpp picks the level
at run time from the CPU that runs. On other architectures only the portable level is built.
"""
import platform

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

# source -> the flags of its ISA level (added to the extension's common flags)
ISA_SOURCES = {"csrc/cpu/gemm_scalar.cpp": []}
# (-Wno-*uninitialized: GCC 12's AVX-512 headers trip these warnings on their own code)
AVX512 = ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
          "-Wno-uninitialized", "-Wno-maybe-uninitialized"]
AVX512_BF16 = AVX512 + ["-mavx512bf16"]
AMX = AVX512_BF16 + ["-mamx-tile", "-mamx-int8"]
AMX_BF16 = AMX + ["-mamx-bf16"]
if X86:
    ISA_SOURCES["csrc/cpu/gemm_avx2.cpp"] = ["-mavx2", "-mfma"]
    ISA_SOURCES["csrc/cpu/gemm_avx512.cpp"] = AVX512
    # the levels below are dropped where the compiler lacks their intrinsics (AVX512-BF16: GCC < 10,
    # AMX: GCC < 11); each needs the one before it
    ISA_SOURCES["csrc/cpu/gemm_avx512bf16.cpp"] = AVX512_BF16
    ISA_SOURCES["csrc/cpu/gemm_amx.cpp"] = AMX
    ISA_SOURCES["csrc/cpu/gemm_amx_bf16.cpp"] = AMX_BF16


def _compiles(compiler, tmpdir, code: str, flags: list[str], link: bool = False) -> bool:
    import os
    import tempfile

    src = os.path.join(tempfile.mkdtemp(dir=tmpdir), "probe.cpp")
    with open(src, "w") as f:
        f.write(code)
    try:
        objs = compiler.compile([src], output_dir=os.path.dirname(src), extra_postargs=flags)
        if link:
            compiler.link_executable(objs, "probe", output_dir=os.path.dirname(src), extra_postargs=flags)
        return True
    except Exception:  # noqa: BLE001 - any failure means: build without this feature
        return False


OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
AMX_PROBE = "#include <immintrin.h>\nvoid f(const void* p) { _tile_loadd(2, p, 64); _tile_dpbusd(0, 2, 3); }\n"
# source -> (macro defined when it is built, probe, flags); in order: a level is built only with the one before
OPTIONAL_LEVELS = {
    "csrc/cpu/gemm_avx512bf16.cpp": ("QR_HAVE_AVX512_BF16", "#include <immintrin.h>\n__m512 f(__m512 a, __m512i b)"
                                     " { return _mm512_dpbf16_ps(a, (__m512bh)b, (__m512bh)b); }\n", AVX512_BF16),
    "csrc/cpu/gemm_amx.cpp": ("QR_HAVE_AMX", AMX_PROBE, AMX),
    "csrc/cpu/gemm_amx_bf16.cpp": ("QR_HAVE_AMX_BF16", "#include <immintrin.h>\nvoid f(const void* p)"
                                   " { _tile_loadd(2, p, 64); _tile_dpbf16ps(0, 2, 3); }\n", AMX_BF16),
}


class BuildExt(build_ext):
    """Compiles each ISA source with its own flags, then links everything into one module.

    With OpenMP available the kernels' threads are torch's own OpenMP team (see csrc/cpu/parallel.cpp).
    """

    def build_extension(self, ext):
        import os

        os.makedirs(self.build_temp, exist_ok=True)
        if _compiles(self.compiler, self.build_temp, OPENMP_PROBE, ["-fopenmp"], link=True):
            ext.extra_compile_args = list(ext.extra_compile_args) + ["-fopenmp"]
            ext.extra_link_args = list(ext.extra_link_args) + ["-fopenmp"]
        sources = dict(ISA_SOURCES)
        ok = True
        for source, (macro, probe, flags) in OPTIONAL_LEVELS.items():
            if source not in sources:
                continue
            ok = ok and _compiles(self.compiler, self.build_temp, probe, flags)
            if ok:
                ext.define_macros = list(ext.define_macros or []) + [(macro, "1")]
            else:
                del sources[source]
        objects = []
        for source, flags in sources.items():
            objects += self.compiler.compile(
                [source],
                output_dir=self.build_temp,
                include_dirs=ext.include_dirs,
                extra_postargs=list(ext.extra_compile_args) + flags,
                depends=ext.depends,
            )
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


ext_modules = [
    Pybind11Extension(
        "qruntime.ops._C",
        sources=["csrc/bindings.cpp", "csrc/cpu/dispatch.cpp", "csrc/cpu/parallel.cpp", "csrc/cpu/decode_plan.cpp"],
        include_dirs=["csrc"],
        depends=["csrc/cpu/kernels.h", "csrc/cpu/gemm_impl.h", "csrc/cpu/sp24_impl.h", "csrc/cpu/decode_impl.h", "csrc/cpu/decode_plan.h", "csrc/cpu/simd_avx512.h",
                 *ISA_SOURCES],
        cxx_std=17,
        extra_compile_args=["-O3"],
        extra_link_args=["-pthread"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
