# The GPU pools' images, one target per role (deployments/locks/README.md):
#   train     training (and convert): CUDA torch + torchtune + this repository
#   quantize  quantization: CUDA torch + llm-compressor + this repository
#   serve     evaluate and benchmark: this repository + lm-eval, and vLLM in a venv of its own (/opt/vllm, `vllm` on
#             PATH), because vLLM pins torch, fastapi and compressed-tensors that conflict with this project's
# Build: docker build --target train -t ghcr.io/your-org/llama4-finetune:train .  (or deploy
# deployments/images.prefect.yaml). Each role installs its lock without resolving again, then this repository at
# /opt/llama4-finetune, where the GPU deployments' pull step runs the flows. PyPI's Linux torch wheels carry CUDA.
FROM python:3.11-slim AS base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# An init as PID 1: it reaps orphans and passes the platform's SIGTERM to the one process it started (not -g: the
# orchestrator stops its trainers itself, after they saved; README "Spot notices"). The Kubernetes pools set the
# container's args, so this entrypoint stays.
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/usr/bin/tini", "--"]
WORKDIR /opt/llama4-finetune
COPY deployments/locks/*.txt deployments/locks/

FROM base AS train
RUN pip install --no-deps -r deployments/locks/train.txt
COPY . .
RUN pip install --no-deps -e .

FROM base AS quantize
RUN pip install --no-deps -r deployments/locks/quantize.txt
COPY . .
RUN pip install --no-deps -e .

FROM base AS serve
RUN python -m venv /opt/vllm && /opt/vllm/bin/pip install --no-deps -r deployments/locks/vllm.txt \
    && ln -s /opt/vllm/bin/vllm /usr/local/bin/vllm
RUN pip install --no-deps -r deployments/locks/serve.txt
COPY . .
RUN pip install --no-deps -e .
