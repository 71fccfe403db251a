# synthsr-bids: SynthSR as a BIDS App (https://bids-apps.neuroimaging.io).
#
#   docker build -t synthsr/synthsr-bids:0.1.0 .                                  # CPU image
#   docker build --build-arg VARIANT=cuda -t synthsr/synthsr-bids:0.1.0-cuda .     # CUDA image
#   docker build --build-arg BAKE_SYNTHSR_V1=1 ...    # also bake the official SynthSR v1 weights
#   docker build --target test -t synthsr-bids:test . # the image plus pytest and the test suite
#
#   docker run --rm --read-only --tmpfs /tmp -u "$(id -u):$(id -g)" \
#     -v /data/ds:/bids:ro -v /data/out:/out synthsr/synthsr-bids:0.1.0 /bids /out participant
#
# Stages: builder (virtual environment with pinned dependencies; torch's C++ headers and
# test binaries removed) -> models (bundled and
# optional baked weights) and templates (TemplateFlow) -> app (small runtime, non-root)
# -> test (app + pytest) ; the last stage, runtime, is the app.
# See docs/containers.md; tools/container/build.sh builds it with podman from a local base.

ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# --------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# cpu: torch's CPU wheels; cuda: torch's default Linux wheels from PyPI (CUDA 12 runtime
# bundled as nvidia-* wheels; the host only needs the NVIDIA driver).
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# Empty: https://download.pytorch.org/whl/cpu for cpu, PyPI for cuda.
ARG TORCH_INDEX_URL=""
# Optional, for builds behind a TLS-inspecting proxy or with a local wheel folder
# (paths inside the build, e.g. mounted with `podman build -v`).
ARG EXTRA_CA_CERT=""
ARG LOCAL_WHEELS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first (a layer that survives code changes), then the package itself.
COPY tools/container/requirements.lock /opt/synthsr-bids/requirements.lock
RUN if [ -n "${EXTRA_CA_CERT}" ]; then export PIP_CERT="${EXTRA_CA_CERT}"; fi; \
    if [ -n "${LOCAL_WHEELS}" ]; then export PIP_FIND_LINKS="${LOCAL_WHEELS}"; fi; \
    case "${VARIANT}" in \
      cpu)  torch_spec="torch==${TORCH_VERSION}+cpu"; \
            torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) torch_spec="torch==${TORCH_VERSION}"; \
            torch_index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      *)    echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 1 ;; \
    esac; \
    pip install --no-cache-dir --extra-index-url "${torch_index}" \
        -c /opt/synthsr-bids/requirements.lock "${torch_spec}" \
 && pip install --no-cache-dir --no-deps -r /opt/synthsr-bids/requirements.lock \
 && torch_dir="$(python -c 'import pathlib, torch; print(pathlib.Path(torch.__file__).parent)')" \
 && rm -rf "${torch_dir}/include" "${torch_dir}/test"
COPY pyproject.toml README.md run.py /opt/synthsr-bids/src/
COPY synthsr_bids /opt/synthsr-bids/src/synthsr_bids
RUN if [ -n "${EXTRA_CA_CERT}" ]; then export PIP_CERT="${EXTRA_CA_CERT}"; fi; \
    pip install --no-cache-dir --no-deps /opt/synthsr-bids/src \
 && pip check \
 && python -c "import torch, synthsr_bids; print('torch', torch.__version__, 'synthsr-bids', synthsr_bids.__version__)"

# --------------------------------------------------------------------------- models
# The bundled default model ships inside the package. BAKE_SYNTHSR_V1=1 adds the official
# SynthSR v1 weights, downloaded and SHA-256-checked against the registry, and converts
# them once so that runs only read them.
FROM builder AS models
ARG BAKE_SYNTHSR_V1=0
ARG EXTRA_CA_CERT=""
ENV SYNTHSR_BIDS_MODELS=/opt/synthsr-bids/models
RUN mkdir -p "${SYNTHSR_BIDS_MODELS}" \
 && if [ "${BAKE_SYNTHSR_V1}" = "1" ]; then \
      if [ -n "${EXTRA_CA_CERT}" ]; then export SSL_CERT_FILE="${EXTRA_CA_CERT}"; fi; \
      synthsr-models fetch synthsr-v1 --cache-dir "${SYNTHSR_BIDS_MODELS}" --no-progress \
      && python -c "from synthsr_bids.models.registry import resolve_model; from synthsr_bids.models.weights import load_weights; import os, pathlib; load_weights(resolve_model('synthsr-v1').path, cache_dir=pathlib.Path(os.environ['SYNTHSR_BIDS_MODELS']) / 'converted')" \
      && synthsr-models verify synthsr-v1 --cache-dir "${SYNTHSR_BIDS_MODELS}"; \
    fi

# --------------------------------------------------------------------------- templates
# FETCH_TEMPLATES=required (default) fails the build when TemplateFlow cannot be reached;
# optional keeps going with the TemplateFlow skeleton only (offline builds).
FROM builder AS templates
ARG FETCH_TEMPLATES=required
ARG EXTRA_CA_CERT=""
ENV TEMPLATEFLOW_HOME=/opt/templateflow
COPY tools/container/fetch_templates.py /opt/synthsr-bids/fetch_templates.py
RUN if [ -n "${EXTRA_CA_CERT}" ]; then export SSL_CERT_FILE="${EXTRA_CA_CERT}" REQUESTS_CA_BUNDLE="${EXTRA_CA_CERT}"; fi; \
    if [ "${FETCH_TEMPLATES}" = "optional" ]; then \
      python /opt/synthsr-bids/fetch_templates.py --optional; \
    else \
      python /opt/synthsr-bids/fetch_templates.py; \
    fi

# --------------------------------------------------------------------------- app
FROM ${BASE_IMAGE} AS app
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG VERSION=0.1.0
ARG VARIANT=cpu
ARG IMAGE_NAME=synthsr/synthsr-bids
# e.g. -cuda: the image's tag is ${IMAGE_NAME}:${VERSION}${TAG_SUFFIX}
ARG TAG_SUFFIX=""
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="synthsr-bids" \
      org.opencontainers.image.description="BIDS App: synthetic 1 mm isotropic T1w MPRAGE from clinical brain MRI of any contrast and resolution (SynthSR in PyTorch)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="https://github.com/synthsr-bids/synthsr-bids" \
      org.opencontainers.image.url="https://github.com/synthsr-bids/synthsr-bids" \
      org.opencontainers.image.documentation="https://github.com/synthsr-bids/synthsr-bids/blob/main/docs/containers.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="synthsr-bids developers" \
      org.synthsr-bids.variant="${VARIANT}"

# A non-root user whose home any UID can use (`docker run -u UID:GID`), as fMRIPrep does.
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash synthsr \
 && mkdir -p /bids /out /work \
 && chmod 1777 /work
COPY --from=builder /opt/venv /opt/venv
COPY --from=models /opt/synthsr-bids/models /opt/synthsr-bids/models
COPY --from=templates /opt/templateflow /opt/templateflow
COPY run.py /run.py
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/synthsr \
    SYNTHSR_BIDS_MODELS=/opt/synthsr-bids/models \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    SYNTHSR_BIDS_CONTAINER_TYPE=docker \
    SYNTHSR_BIDS_CONTAINER_TAG="${IMAGE_NAME}:${VERSION}${TAG_SUFFIX}" \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN chmod 0755 /run.py \
 && chmod -R go=u "${HOME}" \
 && chmod -R a+rX /opt/synthsr-bids /opt/templateflow \
 && /run.py --version \
 && synthsr-models list
USER 1000:1000
WORKDIR /work
ENTRYPOINT ["/run.py"]
CMD ["--help"]

# --------------------------------------------------------------------------- test
# The unit tests inside the image (CircleCI): docker run --rm synthsr-bids:test -m "not slow"
FROM app AS test
USER 0:0
ARG EXTRA_CA_CERT=""
COPY tools/container/requirements-test.lock /opt/synthsr-bids/requirements-test.lock
RUN if [ -n "${EXTRA_CA_CERT}" ]; then export PIP_CERT="${EXTRA_CA_CERT}"; fi; \
    pip install --no-cache-dir --no-deps -r /opt/synthsr-bids/requirements-test.lock \
 && pip check
# The checkout as .dockerignore leaves it (tests/, configs/, ...). `pytest`, unlike
# `python -m pytest`, does not put the source tree on sys.path: the installed package is tested.
COPY . /opt/synthsr-bids/src
RUN chmod -R a+rX /opt/synthsr-bids/src
USER 1000:1000
WORKDIR /opt/synthsr-bids/src
ENTRYPOINT ["pytest", "-p", "no:cacheprovider"]
CMD ["-m", "not slow"]

# --------------------------------------------------------------------------- runtime
FROM app AS runtime
