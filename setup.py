"""r1jax: the DeepSeek-R1 training recipe (SFT, GRPO, rejection sampling, distillation) in JAX."""

from setuptools import find_packages, setup

setup(
    name="r1jax",
    version="0.1.0",
    description="The DeepSeek-R1 recipe written natively for JAX (TPU pod slices, GPUs, CPU).",
    python_requires=">=3.11",
    packages=find_packages(include=["r1jax", "r1jax.*"]),
    package_data={"r1jax": ["data/samples/*"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax",
        "orbax-checkpoint",
        "tensorstore",
        "transformers>=4.50",
        "tokenizers",
        "safetensors",
        "numpy",
        "ml-collections",
        "absl-py",
        "math-verify",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "pyarrow",
    ],
    extras_require={
        # torch is pinned exactly: an unpinned torch pulls a multi-GB CUDA build.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "ruff"],
        # gs:// workdirs: gcsfs for metrics/logs/exports, google-cloud-storage for orbax.
        "gcs": ["gcsfs", "google-cloud-storage"],
        "tpu": ["jax[tpu]", "gcsfs", "google-cloud-storage"],
        "gpu": ["jax[cuda12]"],
    },
)
