"""Which C++/CUDA extensions setup.py builds: ``bgpo._C`` from ``csrc/``.

* The CPU sources are always built when torch is importable at build time
  (``pip install --no-build-isolation -e .``).  Without torch (a plain ``pip install -e .`` with build
  isolation) no extension is built and the library runs on its PyTorch/Triton paths; this says so.
* The CUDA sources are added when torch is a CUDA build and a CUDA toolkit (nvcc) is found.  No GPU is
  needed to compile.

Environment switches (README, "Building the extension"):

``BGPO_SKIP_EXTENSION=1``   build no extension at all (pure-Python install).
``BGPO_SKIP_CUDA_BUILD=1``  build the CPU extension only, even when a CUDA toolkit is present.
``BGPO_FORCE_CUDA_BUILD=1`` fail instead of silently skipping CUDA when torch or the toolkit lacks CUDA.
``TORCH_CUDA_ARCH_LIST``    GPU architectures (default ``8.0;9.0+PTX``: A100, H100 machine code, and
                            compute_90 PTX that the driver compiles for newer GPUs, e.g. sm_100).
                            The kernels need sm_80+ (bf16); bgpo.ops._cpp refuses older GPUs.
``MAX_JOBS``                parallel compile jobs (ninja); default: torch's choice.
``BGPO_NVCC_THREADS``       nvcc ``--threads`` (architectures compiled in parallel per file; default 1).
``BGPO_WERROR=1``           warnings are errors in the project's own code (CI sets it).
``CUDA_HOME``               the toolkit root; if unset or wrong, it is taken from nvcc itself.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

NAME = "bgpo._C"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
CPU_SOURCES = ["csrc/ops.cpp", "csrc/random_mask.cpp", "csrc/fused_elbo_loss.cpp", "csrc/python_module.cpp"]
CUDA_SOURCES = ["csrc/random_mask_cuda.cu", "csrc/fused_elbo_loss_cuda.cu"]

_ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(message: str) -> None:
    print(f"bgpo setup: {message}", file=sys.stderr, flush=True)


def _is_toolkit(root: Path) -> bool:
    return (root / "include" / "cuda_runtime.h").is_file() and (root / "bin").is_dir()


def _nvcc_top(nvcc: str) -> Path | None:
    """The toolkit root nvcc reports (``TOP=`` in ``--dryrun``): right even when nvcc is a wrapper script."""
    try:
        run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", run.stdout + run.stderr, flags=re.MULTILINE)
    return Path(match.group(1).strip()).resolve() if match else None


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME if it is one, else where nvcc lives, else /usr/local/cuda.

    torch's own guess, ``dirname(dirname(which nvcc))``, is wrong when nvcc on the PATH is a wrapper or
    a symlink outside the toolkit (then the link fails on -lcudart); asking nvcc avoids that.
    """
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        top = _nvcc_top(nvcc)
        if top is not None:
            candidates.append(top)
        candidates.append(Path(nvcc).resolve().parent.parent)
        candidates.append(Path(nvcc).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if _is_toolkit(root):
            if os.environ.get("CUDA_HOME") and Path(os.environ["CUDA_HOME"]) != root:
                _say(f"CUDA_HOME={os.environ['CUDA_HOME']} is not a CUDA toolkit root; using {root}")
            return str(root)
    return None


def _werror() -> list[str]:
    return ["-Werror"] if _flag("BGPO_WERROR") else []


def _system_includes(include_dirs: list[str]) -> list[str]:
    # torch's headers as system headers: -Wall -Wextra then reports the project's own code only.
    return [arg for d in include_dirs for arg in ("-isystem", d)]


def extensions():
    if _flag("BGPO_SKIP_EXTENSION"):
        _say("BGPO_SKIP_EXTENSION is set: not building the C++/CUDA extension bgpo._C.")
        return []
    try:
        import torch  # noqa: F401
    except ImportError:
        _say(
            "torch is not importable at build time, so the C++/CUDA extension bgpo._C is NOT built; bgpo "
            "will run on its PyTorch/Triton paths.  To build it: install torch, then "
            "`pip install --no-build-isolation -e .` (README, 'Building the extension')."
        )
        return []

    with_cuda = False
    cuda_home = None
    if _flag("BGPO_SKIP_CUDA_BUILD"):
        _say("BGPO_SKIP_CUDA_BUILD is set: building the CPU extension only.")
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
        if _flag("BGPO_FORCE_CUDA_BUILD"):
            raise RuntimeError(f"BGPO_FORCE_CUDA_BUILD is set but {reason}")
        _say(f"{reason}: building the CPU extension only.")
    else:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            reason = "no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)"
            if _flag("BGPO_FORCE_CUDA_BUILD"):
                raise RuntimeError(f"BGPO_FORCE_CUDA_BUILD is set but {reason}")
            _say(f"{reason}: building the CPU extension only.")
        else:
            with_cuda = True
            # torch.utils.cpp_extension reads these when it is first imported.
            os.environ["CUDA_HOME"] = cuda_home
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
            _say(f"building CPU and CUDA kernels (CUDA_HOME={cuda_home}, "
                 f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")

    from torch.utils import cpp_extension

    include_dirs = cpp_extension.include_paths(device_type="cuda" if with_cuda else "cpu")
    warnings = ["-Wall", "-Wextra"] + _werror()
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"] + warnings + _system_includes(include_dirs)
    macros = []
    sources = list(CPU_SOURCES)
    extension = cpp_extension.CppExtension
    extra = {"cxx": cxx}
    if with_cuda:
        sources += CUDA_SOURCES
        extension = cpp_extension.CUDAExtension
        macros.append(("BGPO_WITH_CUDA", None))
        host = ",".join(["-Wall", "-Wextra"] + _werror())
        nvcc = ["-O3", "-lineinfo", f"--threads={os.environ.get('BGPO_NVCC_THREADS', '1')}",
                f"-Xcompiler={host}"] + _system_includes(include_dirs)
        if _flag("BGPO_WERROR"):
            nvcc.append("--Werror=all-warnings")
        extra["nvcc"] = nvcc
    return [
        extension(
            name=NAME,
            sources=sources,
            include_dirs=[str(_ROOT / "csrc")],
            define_macros=macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ]


def cmdclass():
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}
    # ninja when available (it honours MAX_JOBS); paths relative to the project so that builds are
    # reproducible and the sources can live anywhere.
    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}
