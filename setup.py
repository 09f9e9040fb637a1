"""Installable package `lars`: LARS, TVLARS and LAMB optimizers and a Horovod ImageNet trainer."""

from setuptools import find_packages, setup

setup(
    name="lars-imagenet",
    version="0.1.0",
    description="Exact, fast LARS / TVLARS / LAMB and a Horovod trainer for large-batch ImageNet",
    python_requires=">=3.9",
    packages=find_packages(include=["lars", "lars.*"]),
    package_data={"lars.optim": ["_fused_cpu.cpp"]},  # built on first use (lars.optim._fused)
    py_modules=["pytorch_imagenet_resnet"],
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "pillow",
        "tensorboard",
        "scikit-learn",  # ships the handwritten digits that the sample dataset is built from
        "pyyaml",
        "matplotlib",  # lars.report draws the curves
    ],
    extras_require={
        "horovod": ["horovod==0.28.1", "mpi4py"],
        "dali": ["nvidia-dali-cuda130==2.4.0"],  # --data-backend dali-cpu|dali-gpu
        "dev": ["pytest", "ruff==0.17.6"],
    },
    entry_points={"console_scripts": ["lars-train=lars.cli:main", "lars-sweep=lars.sweep:main"]},
)
