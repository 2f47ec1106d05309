"""megatron-prune: structured pruning + online distillation for Megatron-Core models."""

from setuptools import find_packages, setup

setup(
    name="megatron-prune",
    version="0.1.0",
    description="Structured pruning with weight re-initialisation and online knowledge "
    "distillation for Megatron-Core LLMs (Pangu Light; AlphaPruning and Tyr-the-Pruner "
    "allocation planned)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_prune", "megatron_prune.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.12,<0.17",  # supported range: megatron_prune/compat.py
        "safetensors",
        "tokenizers",
        "gguf",
        "numpy",
        "pyyaml",
        "tqdm",
        "psutil",
        "transformers>=4.50",
        "sentencepiece",
        "accelerate",
        "matplotlib",  # report plots
    ],
    # No "gpu" or "deepspeed" extra: the GPU path needs only torch with CUDA, PyPI's "apex" is
    # an unrelated package (NVIDIA apex is built from source), and nothing here uses DeepSpeed.
    # See README, "Installing".
    extras_require={
        "npu": ["torch_npu"],
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
        "dev": ["pytest", "ruff", "rdata", "tensorboard", "wandb"],
    },
    entry_points={"console_scripts": ["megatron-prune=megatron_prune.cli:main"]},
)
