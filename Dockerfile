# A peerlearn peer. Built for a portable baseline ISA (no -march=native); the
# native module picks wider SIMD at run time.
#
#   docker build -t peerlearn .                               # CPU torch (default)
#   docker build -t peerlearn:cu128 --build-arg TORCH_VARIANT=cu128 .   # CUDA 12.8 torch
#
# Run (the image's CMD is --help; docs/operations.md has the full story):
#   docker run -e PEERLEARN_SECRET -p 7400:7400 -p 7401:7401 -p 127.0.0.1:9400:9400 \
#     -v peerlearn:/data peerlearn run --listen HOST:7400 --data-port 7401 \
#     --data-dir /data --metrics 0.0.0.0:9400 [--join MEMBER:7400]
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ cmake ninja-build \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml CMakeLists.txt README.md constraints.txt ./
COPY native native
COPY peerlearn peerlearn
# constraints.txt pins what a fresh install resolves (the build backend too:
# PIP_CONSTRAINT reaches pip's isolated build environment, -c does not).
RUN PIP_CONSTRAINT=/src/constraints.txt pip wheel --no-cache-dir --no-deps -w /wheels .

FROM ${PYTHON_IMAGE}
# Which torch build is installed is chosen here, explicitly. A plain
# `pip install torch` on x86_64 Linux pulls the CUDA build from PyPI (torch plus
# several GB of nvidia-* wheels), needed or not. So torch comes from PyTorch's
# own index for the variant named: cpu (the default:
# https://download.pytorch.org/whl/cpu), or a CUDA build such as cu126 or
# cu128 (https://download.pytorch.org/whl/cu128) for a GPU host. --index-url,
# not --extra-index-url: with PyPI as a second index pip could still pick
# PyPI's CUDA wheel of the same version. The extension never links libtorch,
# so any build works with it; the check below fails the build on a mix-up.
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}" \
    && python -c "import sys, torch; cuda = torch.version.cuda; \
print('torch', torch.__version__, 'cuda', cuda); \
sys.exit((cuda is None) != (sys.argv[1] == 'cpu'))" "${TORCH_VARIANT}"
COPY --from=build /wheels /wheels
COPY --from=build /src/constraints.txt /wheels/
RUN pip install --no-cache-dir -c /wheels/constraints.txt /wheels/*.whl && rm -rf /wheels

# Not root: a peer needs no privilege (its ports are above 1024). /data holds
# its identity, checkpoints and applied record; a named volume mounted there
# takes this ownership.
RUN groupadd --system --gid 10001 peerlearn \
    && useradd --system --uid 10001 --gid peerlearn --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin peerlearn \
    && mkdir -p /data && chown peerlearn:peerlearn /data
USER 10001:10001
WORKDIR /data
# The source revision the metrics report (peerlearn_build_info): a wheel
# carries none, so the build says it: --build-arg GIT_REVISION=$(git rev-parse HEAD).
ARG GIT_REVISION=unknown
ENV HOME=/data PEERLEARN_BUILD_REVISION=${GIT_REVISION}
VOLUME ["/data"]

# 7400: control socket (--listen, the default port); 7401: data plane
# (--data-port; the peer picks a random port unless told, so fix it and
# publish it); 9400: Prometheus metrics (--metrics 0.0.0.0:9400; never publish
# it beyond the network Prometheus scrapes from). All TCP.
EXPOSE 7400/tcp 7401/tcp 9400/tcp

# Healthy while the metrics endpoint answers: the peer has joined a swarm and
# its daemon runs (metrics start after the join). Whether the swarm makes
# progress is for the alert rules (deploy/alerts.yml), not for a restart.
# Another metrics address: set PEERLEARN_HEALTH_URL.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('PEERLEARN_HEALTH_URL', 'http://127.0.0.1:9400/metrics'), timeout=4)"]

ENTRYPOINT ["peerlearn"]
CMD ["--help"]
