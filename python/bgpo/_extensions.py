"""Register the optional backends: the Triton kernels (``bgpo_kernels``) and the C++/CUDA extension.

Each is optional: when it is missing the library runs on its PyTorch paths.  The C++/CUDA extension
``bgpo._C`` registers the "cpu" and "cuda" backends (``bgpo.ops._cpp``); when it is not built, a single
``bgpo.ops._cpp.ExtensionNotBuiltWarning`` says so.
"""
from __future__ import annotations

import importlib.util


def load() -> None:
    if importlib.util.find_spec("triton") is not None and importlib.util.find_spec("bgpo_kernels") is not None:
        import bgpo_kernels

        bgpo_kernels.register()

    from .ops import _cpp

    _cpp.load()
