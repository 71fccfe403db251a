#!/usr/bin/env bash
# Build the synthsr-bids image locally with podman (or buildah), without a Docker engine
# and without a container registry: the base image is made here with debootstrap
# (Debian bookworm + python3 3.11) and imported with `podman import`.
#
#   sudo tools/container/build.sh                      # CPU image synthsr-bids:local (+ :test)
#   sudo tools/container/build.sh --variant cuda       # CUDA image
#   sudo tools/container/build.sh --base python:3.11.14-slim-bookworm   # a registry is reachable
#   sudo tools/container/build.sh --smoke              # then run it --read-only as UID 12345
#
# Environment: MIRROR (Debian mirror for debootstrap), CONTAINERS_CONF (default: a file
# written next to the base rootfs with default_ulimits = [] and cgroup_manager = "cgroupfs",
# needed in unprivileged sandboxes), LOCAL_WHEELS_DIR (a folder of wheels, e.g. the
# torch CPU wheel, mounted into the build), EXTRA_CA_CERT_FILE (a CA bundle for pip
# behind a TLS-inspecting proxy; default: the host's bundle).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/../.." && pwd)"
variant=cpu
base=""
tag=synthsr-bids:local
smoke=0
bake_v1=0
fetch_templates=optional
state="${SYNTHSR_BIDS_BUILD_STATE:-/var/tmp/synthsr-bids-build}"
mirror="${MIRROR:-http://deb.debian.org/debian}"

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    --bake-synthsr-v1) bake_v1=1; shift ;;
    --require-templates) fetch_templates=required; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown option $1" >&2; usage 64 ;;
  esac
done

engine="$(command -v podman || command -v buildah || true)"
if [ -z "${engine}" ]; then
  echo "neither podman nor buildah is installed: apt-get install podman buildah" >&2
  exit 69
fi
mkdir -p "${state}"
if [ -z "${CONTAINERS_CONF:-}" ]; then
  export CONTAINERS_CONF="${state}/containers.conf"
  cat > "${CONTAINERS_CONF}" <<'CONF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
CONF
fi

if [ -z "${base}" ]; then
  base=localhost/synthsr-base:bookworm-py311
  if ! "${engine}" image exists "${base}" 2>/dev/null; then
    command -v debootstrap >/dev/null || { echo "apt-get install debootstrap" >&2; exit 69; }
    rootfs="${state}/rootfs"
    if [ ! -x "${rootfs}/usr/bin/python3" ]; then
      rm -rf "${rootfs}"
      echo "debootstrap bookworm (python3, python3-venv) into ${rootfs} ..."
      nice -n 19 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "${rootfs}" "${mirror}"
      rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/*
    fi
    tar -C "${rootfs}" -c . | "${engine}" import --change 'CMD ["/bin/bash"]' - "${base}"
  fi
fi

version="$(python3 -c 'import re,sys; print(re.search(r"__version__ = \"([^\"]+)\"", open(sys.argv[1]).read()).group(1))' "${repo}/synthsr_bids/__init__.py")"
build_args=(
  --build-arg "BASE_IMAGE=${base}"
  --build-arg "VARIANT=${variant}"
  --build-arg "VERSION=${version}"
  --build-arg "VCS_REF=$(git -C "${repo}" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  --build-arg "BAKE_SYNTHSR_V1=${bake_v1}"
  --build-arg "FETCH_TEMPLATES=${fetch_templates}"
)
volumes=()
wheels="${LOCAL_WHEELS_DIR:-}"
if [ -z "${wheels}" ] && ls /opt/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then wheels=/opt/wheels; fi
if [ -n "${wheels}" ]; then
  volumes+=(-v "${wheels}:/run/local-wheels:ro")
  build_args+=(--build-arg LOCAL_WHEELS=/run/local-wheels --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
fi
ca="${EXTRA_CA_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
if [ -f "${ca}" ]; then
  volumes+=(-v "${ca}:/run/host-ca.crt:ro")
  build_args+=(--build-arg EXTRA_CA_CERT=/run/host-ca.crt)
fi

cd "${repo}"
for target in runtime test; do
  name="${tag}"
  [ "${target}" = test ] && name="${tag%%:*}:test"
  echo "building ${name} (target ${target}, ${variant}, base ${base}) ..."
  nice -n 19 "${engine}" build --format docker --network host --layers "${volumes[@]}" "${build_args[@]}" \
    --target "${target}" -t "${name}" -f Dockerfile .
done
"${engine}" image inspect "${tag}" --format '{{.Size}}' | awk '{printf "image size: %.0f MB\n", $1/1e6}'

if [ "${smoke}" = 1 ]; then
  "${here}/smoke.sh" "${tag}"
fi
