# A peerlearn peer. Built for a portable baseline ISA (no -march=native); the
# native module picks wider SIMD at run time.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends g++ cmake ninja-build \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml CMakeLists.txt README.md ./
COPY native native
COPY peerlearn peerlearn
RUN pip wheel --no-deps -w /wheels .

FROM python:3.11-slim
# Any torch build works with the extension; pin the one you deploy.
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir torch==${TORCH_VERSION}
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENTRYPOINT ["peerlearn"]
CMD ["--help"]
