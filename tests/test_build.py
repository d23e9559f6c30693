"""What the build must deliver, so that a lost build feature fails the run instead of skipping tests:

- the C++ extension ``qruntime.ops._C`` is built and loaded;
- every ISA level that this machine's compiler can build is in it (setup.py drops AVX512-BF16 and the
  AMX levels only where the compiler lacks their intrinsics), and every level this CPU can run is offered;
- the Triton kernels import as ``qruntime.kernels`` and never shadow a top-level ``kernels`` package
  (transformers imports one from PyPI), also when Python runs from the repository root.
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from conftest import require
from qruntime.ops import registry as ops
from qruntime.ops.extension import DISABLE_ENV, extension

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")
# The flags setup.py compiles the optional levels with, and their probes (each level needs the one before).
AVX512_FLAGS = ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
OPTIONAL_LEVELS = {
    "avx512_bf16": (AVX512_FLAGS + ["-mavx512bf16"],
                    "#include <immintrin.h>\n__m512 f(__m512 a, __m512i b)"
                    " { return _mm512_dpbf16_ps(a, (__m512bh)b, (__m512bh)b); }\n"),
    "amx_int8": (AVX512_FLAGS + ["-mavx512bf16", "-mamx-tile", "-mamx-int8"],
                 "#include <immintrin.h>\nvoid f(const void* p) { _tile_loadd(2, p, 64); _tile_dpbusd(0, 2, 3); }\n"),
    "amx_bf16": (AVX512_FLAGS + ["-mavx512bf16", "-mamx-tile", "-mamx-int8", "-mamx-bf16"],
                 "#include <immintrin.h>\nvoid f(const void* p) { _tile_loadd(2, p, 64); _tile_dpbf16ps(0, 2, 3); }\n"),
}
# /proc/cpuinfo flags each level needs
AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
CPU_FLAGS = {
    "avx2": {"avx2", "fma"},
    "avx512_vnni": AVX512,
    "avx512_bf16": AVX512 | {"avx512_bf16"},
    "amx_int8": AVX512 | {"avx512_bf16", "amx_tile", "amx_int8"},
    "amx_bf16": AVX512 | {"avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"},
}


def _require_extension():
    disabled = os.environ.get(DISABLE_ENV, "") not in ("", "0")
    require(extension() is not None, "the C++ extension qruntime.ops._C is not built or does not load",
            allowed=f"disabled by {DISABLE_ENV}" if disabled else None)


def _compiler_builds(tmp_path, level: str) -> bool:
    flags, probe = OPTIONAL_LEVELS[level]
    cxx = shlex.split(sysconfig.get_config_var("CXX") or "c++")
    src = tmp_path / f"probe_{level}.cpp"
    src.write_text(probe)
    result = subprocess.run([*cxx, "-c", str(src), "-o", str(tmp_path / f"probe_{level}.o"), *flags],
                            capture_output=True, text=True)
    return result.returncode == 0


def test_the_cpp_extension_is_built_and_runs():
    _require_extension()
    assert ops.cpu_backend().startswith("cpp:"), ops.cpu_backend()
    assert ops.SP24_CPU_KERNELS


def test_every_isa_level_the_compiler_can_build_is_built(tmp_path):
    _require_extension()
    expected = ["scalar"]
    if X86:
        expected += ["avx2", "avx512_vnni"]
        for level in OPTIONAL_LEVELS:  # in order: a level is built only where the one before is
            if not _compiler_builds(tmp_path, level):
                break
            expected.append(level)
    assert ops.compiled_cpu_isas() == expected


def test_every_level_this_cpu_runs_is_offered():
    _require_extension()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read this CPU's features from (not Linux)")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    compiled = ops.compiled_cpu_isas()
    expected = [isa for isa in compiled if isa == "scalar" or CPU_FLAGS[isa] <= flags]
    assert ops.supported_cpu_isas() == expected, (compiled, sorted(flags & set().union(*CPU_FLAGS.values())))


def _run_from_root(args: list[str], fake_site: Path | None) -> subprocess.CompletedProcess:
    """Runs ``python <args>`` from the repository root, as a user would; with ``fake_site``, a regular
    package named ``kernels`` is installed there (on PYTHONPATH: after the working directory, as
    site-packages is)."""
    path = [str(fake_site)] if fake_site is not None else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + list(filter(None, [os.environ.get("PYTHONPATH")]))))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def fake_site(tmp_path):
    package = tmp_path / "site" / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("MARK = 'the installed kernels package'\n")
    return tmp_path / "site"


def test_the_kernels_folder_never_shadows_an_installed_kernels_package(fake_site):
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a folder without __init__.py"
    code = textwrap.dedent("""
        import kernels, qruntime, qruntime.kernels.dispatch
        assert kernels.MARK == 'the installed kernels package', kernels
        assert qruntime.kernels.dispatch.__name__ == 'qruntime.kernels.dispatch'
        print('ok')
    """)
    result = _run_from_root(["-c", code], fake_site)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("args", [
    ["-c", "import transformers.modeling_utils, qruntime"],
    ["-m", "qruntime", "--help"],
    ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_formats.py", "-k", "round_trip"],
], ids=["import", "cli", "pytest"])
def test_the_readme_entry_points_work_from_the_repository_root(args, fake_site):
    """What broke a fresh install once: from the repository root, `python -c`, `python -m qruntime` and
    `python -m pytest` put the root first on sys.path. With transformers' own `kernels` package installed
    (in its real form when present, else the stand-in above) they must all work."""
    import importlib.util

    installed = importlib.util.find_spec("kernels")
    real = installed is not None and installed.origin not in (None, "namespace")  # a regular package
    result = _run_from_root(args, None if real else fake_site)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])


def _names(requirements) -> set[str]:
    import re

    return {re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9._-]+)", r).group(1)).lower() for r in requirements}


def test_the_lock_pins_every_dependency_and_leaves_torch_alone():
    """constraints.txt (scripts/relock.sh) pins every package pyproject.toml asks for, the test extra and
    the C++ build's requirements, at the versions requirements-data.txt pins for the offline data; never
    torch, which scripts/install.sh installs only where none is."""
    import re

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip()).groups()
            pins[_names([name]).pop()] = version
    wanted = (_names(project["project"]["dependencies"]) | _names(project["project"]["optional-dependencies"]["test"])
              | _names(project["build-system"]["requires"])) - {"torch"}
    assert wanted <= pins.keys(), sorted(wanted - pins.keys())
    assert "torch" not in pins and "pip" not in pins and "qruntime" not in pins
    for line in (ROOT / "requirements-data.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            assert pins.get(_names([name]).pop()) == version.strip(), line


def test_the_package_version_is_the_project_version():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    import qruntime

    assert qruntime.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
