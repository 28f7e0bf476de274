# GPU image: CUDA JAX and PyTorch side by side.
#   docker build -t vit-mirror .
#   docker run --gpus all --rm -v /path/to/checkpoints:/ckpt vit-mirror \
#       python -m vit_torch logits /ckpt/ViT-B_16.npz --config ViT-B_16 --input /ckpt/x.npy --output /ckpt/y.npy
# CUDA 13 for both frameworks (torch 2.14.1 is a CUDA 13 build; the gpu extra installs jax[cuda13]):
# the host needs an NVIDIA driver of the 580 series or newer.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /vit-mirror
COPY pyproject.toml README.md Makefile ./
COPY vit_jax vit_jax
COPY vit_torch vit_torch
COPY parity parity
COPY tests tests
COPY docs docs
COPY examples examples
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir -e '.[test,gpu]'
ENV PATH=/opt/venv/bin:$PATH
CMD ["python", "-m", "pytest", "-q"]
