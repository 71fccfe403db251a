#!/usr/bin/env bash
# Run a built image the way clusters and careful users do: read-only root filesystem,
# a tmpfs /tmp, an arbitrary UID:GID, no network; participant level, then group level.
#
#   tools/container/smoke.sh IMAGE [DIR]
#
# Writes a 2-subject phantom dataset and a tiny test model into DIR (default: a new
# temporary folder) using the image's own Python, runs the app, and prints the outputs.
# Uses podman, else docker (ENGINE=... to choose). Exit status: the first failure.
# With podman, CONTAINERS_CONF defaults to the file tools/container/build.sh wrote.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
image="${1:?usage: smoke.sh IMAGE [DIR]}"
dir="${2:-$(mktemp -d)}"
engine="${ENGINE:-$(command -v podman || command -v docker || true)}"
if [ -z "${engine}" ]; then
  echo "neither podman nor docker is installed" >&2
  exit 69
fi
# podman in a sandbox needs the containers.conf that build.sh writes (see build.sh).
state="${SYNTHSR_BIDS_BUILD_STATE:-/var/tmp/synthsr-bids-build}"
if [ -z "${CONTAINERS_CONF:-}" ] && [ -f "${state}/containers.conf" ]; then
  export CONTAINERS_CONF="${state}/containers.conf"
fi
uid_gid="${SMOKE_USER:-12345:12345}"
mkdir -p "${dir}/bids" "${dir}/out" "${dir}/models"
chmod 0777 "${dir}/bids" "${dir}/out" "${dir}/models"

echo "== making a phantom dataset and a tiny model in ${dir}"
"${engine}" run --rm -i --network none --user "${uid_gid}" --tmpfs /tmp \
  -v "${dir}/bids:/bids" -v "${dir}/models:/models" --entrypoint python "${image}" \
  - /bids /models < "${here}/make_smoke_dataset.py"

run_app() {
  "${engine}" run --rm --network none --read-only --tmpfs /tmp --user "${uid_gid}" \
    -v "${dir}/bids:/bids:ro" -v "${dir}/out:/out" -v "${dir}/models:/models:ro" \
    "${image}" /bids /out "$@"
}
echo "== bundled models inside the image (size and SHA-256 against the registry)"
"${engine}" run --rm --network none --read-only --tmpfs /tmp --user "${uid_gid}" --entrypoint synthsr-models \
  "${image}" verify synthsr-bids synthsr-bids-seg
echo "== participant level (read-only, --user ${uid_gid}, no network)"
run_app participant --model /models/tiny.safetensors --nthreads 1
echo "== group level"
run_app group --skip-registration
echo "== outputs"
(cd "${dir}/out" && find . -type f -not -path './logs/*' | sort)
