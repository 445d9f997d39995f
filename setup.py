"""mae-fast: one distribution, one import namespace (``mae_fast``).

The top-level source folders ``kernels/``, ``train/`` and ``bench/`` are installed as
``mae_fast.kernels``, ``mae_fast.train`` and ``mae_fast.bench`` so that nothing generic
(``kernels``, ``train``, ``bench``) lands in site-packages.
"""
from setuptools import setup

DALI = "nvidia-dali-cuda130; platform_system == 'Linux' and platform_machine == 'x86_64'"
# DALI's CPU pipeline runs without a GPU, so the tests compare it with the PIL loader
# transformers: the Hugging Face ViTMAE interop tests; scikit-learn: the digits data of the probe tests;
# pytest-xdist: the suite runs one worker per core (tests/conftest.py)
HF = ["transformers>=4.40"]
TEST = ["pytest>=7", "pytest-xdist>=3", "scikit-learn", DALI, *HF]
GPU = ["xformers", DALI]

setup(
    name="mae-fast",
    version="0.1.0",
    description="Fast, exact Masked Autoencoders (He et al., 2021) for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["mae_fast", "mae_fast.kernels", "mae_fast.train", "mae_fast.train.data", "mae_fast.train.engine",
              "mae_fast.train.evaluation", "mae_fast.bench"],
    package_dir={
        "mae_fast": "mae_fast",
        "mae_fast.kernels": "kernels",
        "mae_fast.train": "train",
        "mae_fast.bench": "bench",
    },
    install_requires=[
        "torch>=2.5",
        # timm >= 0.9 works with current torch (0.3.2, the official pin, does not);
        # no upper pin so pip never swaps the user's torch for another build.
        "timm>=0.9",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "pillow",
        "tensorboard",
        "safetensors",
        "webdataset",
    ],
    package_data={"mae_fast": ["assets/demo/*.jpg"]},
    include_package_data=True,
    extras_require={
        "test": TEST,
        "gpu": GPU,
        "hf": HF,
        "all": sorted(set(TEST + GPU + HF)),
    },
    entry_points={
        "console_scripts": [
            "mae-flops=mae_fast.bench.flops:main",
            "mae-bench=mae_fast.bench.throughput:main",
            "mae-pretrain=mae_fast.train.pretrain:main",
            "mae-finetune=mae_fast.train.finetune:main",
            "mae-linprobe=mae_fast.train.linprobe:main",
            "mae-visualize=mae_fast.train.visualize:main",
            "mae-plot=mae_fast.train.engine.plots:main",
            "mae-profile=mae_fast.bench.profile:main",
            "mae-convert=mae_fast.convert:main",
            "mae-make-shards=mae_fast.train.make_shards:main",
        ],
    },
)
