# Corral on a CPU: `corral serve` with the chat page, the API and /metrics on port 8321.
#
#   docker build -t corral .
#   docker run -p 8321:8321 -v corral-data:/data corral                         # local (the default)
#   docker run -p 8321:8321 -v corral-data:/data -e CORRAL_PG_DSN=postgresql://... corral \
#       corral serve --host 0.0.0.0 --config postgres
#   docker run -p 8321:8321 -v corral-data:/data -e VLLM_URL=http://vllm:8000/v1 -e VLLM_MODEL=... corral \
#       corral serve --host 0.0.0.0 --config remote-vllm
#
# The model cache and the server's stores live in CORRAL_HOME=/data: mount a volume there, so models are
# downloaded once and chats, files and vector stores survive the container. See docs/distributions.md.
FROM python:3.11-slim-bookworm

# A C toolchain and cmake: the `.[all]` install compiles llama.cpp (llama-cpp-python, a test extra)
# and Corral builds its int8 kernel with the C compiler at first use. bubblewrap: the code interpreter's
# sandbox. (The README's chromium packages are for the browser tests only: not in the image.)
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake bubblewrap \
    && rm -rf /var/lib/apt/lists/*

# torch==2.13.0 from PyPI is the CUDA build on Linux; the CPU wheels come from PyTorch's own index.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_NO_CACHE_DIR=1 \
    CORRAL_HOME=/data

WORKDIR /opt/corral
COPY . .
# The README's install step after its Debian packages, unchanged (tests/stack/test_distributions.py checks).
RUN python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[all]'
ENV PATH=/opt/corral/.venv/bin:$PATH

VOLUME ["/data"]
EXPOSE 8321
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8321/v1/health')"
CMD ["corral", "serve", "--host", "0.0.0.0", "--config", "local"]
