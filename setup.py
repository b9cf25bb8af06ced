"""Build and install bgpo.

``pip install -e .`` installs the Python package (``bgpo``, from ``python/bgpo``) and the Triton
kernels (``bgpo_kernels``).  The C++/CUDA extension ``bgpo._C`` is built from ``csrc/`` when torch is
importable at build time (``pip install --no-build-isolation -e .`` after installing torch); see
README, "Building the extension".
"""
from pathlib import Path

from setuptools import find_packages, setup

import build_ext_config

README = Path(__file__).resolve().parent / "README.md"

setup(
    name="bgpo",
    version="0.1.0",
    description="Memory-flat RL for masked diffusion LMs: BGPO, fused logit-free ELBO kernels, a trainer",
    long_description=README.read_text(encoding="utf-8") if README.is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(where="python") + ["bgpo_kernels"],
    package_dir={"": "python", "bgpo_kernels": "bgpo_kernels"},
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        # what the test suite needs beyond torch: Hugging Face models for the adapter tests,
        # safetensors for checkpoint loading, matplotlib/tqdm for the benchmarks it runs
        "test": ["pytest>=8", "transformers>=4.56.2", "safetensors>=0.4", "matplotlib", "tqdm",
                 "trl>=1.16,<1.17", "datasets", "pyyaml", "math-verify", "peft", "deepspeed>=0.19,<0.20"],
        # The releases on which tests/test_philox.py passed (3.6.0, 3.8.0; 3.7 untested): the masks are
        # bit-exact with the other backends only where Triton's Philox stream is proven (README, Triton kernels).
        "triton": ["triton>=3.6,<3.9,!=3.7.*"],
        "bench": ["matplotlib", "tqdm"],
        "models": ["safetensors>=0.4"],
        "hf": ["transformers>=4.46", "safetensors>=0.4"],
        "flash": ["flash-attn>=2.5"],
        # bgpo.integrations.trl overrides private GRPOTrainer methods: pinned to the tested minor release
        "trl": ["trl>=1.16,<1.17"],
        # DeepSpeed ZeRO-1/2/3 under the TRL trainer (tested on the CPU with gloo at this release)
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "train": ["transformers>=4.46", "safetensors>=0.4", "pyyaml", "tqdm", "datasets", "math-verify", "peft"],
    },
    package_data={"bgpo": ["configs/*.yaml"]},
    entry_points={"console_scripts": ["bgpo=bgpo.cli:main"]},
    ext_modules=build_ext_config.extensions(),
    cmdclass=build_ext_config.cmdclass(),
)
