"""Build and install bgpo.

``pip install -e .`` installs the Python package (``bgpo``, from ``python/bgpo``) and the Triton
kernels (``bgpo_kernels``).  The C++/CUDA extension ``bgpo._C`` is built from ``csrc/`` when torch is
importable at build time (``pip install --no-build-isolation -e .`` after installing torch); see
README, "Building the extension".
"""
from setuptools import setup

import build_ext_config

setup(
    name="bgpo",
    version="0.1.0",
    description="Memory-flat RL for masked diffusion LMs: BGPO, fused logit-free ELBO kernels, a trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["bgpo", "bgpo.ops", "bgpo_kernels"],
    package_dir={"bgpo": "python/bgpo", "bgpo.ops": "python/bgpo/ops", "bgpo_kernels": "bgpo_kernels"},
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        # Philox streams differ in older Triton releases: the masks are only bit-exact in this range.
        "triton": ["triton>=3.8,<3.10"],
        "bench": ["matplotlib", "tqdm"],
        "train": ["transformers>=4.45", "safetensors", "pyyaml", "tqdm"],
    },
    ext_modules=build_ext_config.extensions(),
    cmdclass=build_ext_config.cmdclass(),
)
