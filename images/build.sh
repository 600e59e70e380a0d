#!/usr/bin/env bash
# Builds every chunk-ops image (`make images`):
#   chunk-ops-base:bookworm      local Debian + Python base (images/base/build.sh; skipped with BASE_IMAGE)
#   chunk-ops-worker:$TAG        the worker (ENTRYPOINT chunk-ops)
#   chunk-ops-airflow:$TAG       Airflow 3.3 + providers + chunk_ops + dags/ + plugins/
#   chunk-ops-sqs:$TAG           moto's SQS-compatible server (docker-compose)
#   chunk-ops-postgres:$TAG      PostgreSQL 15 from Debian (docker-compose)
#
# Wheels come from the host: build/wheelhouse (every pinned requirement, `pip wheel`)
# and build/dist (chunk-ops itself), bind-mounted into the builds, so the Python
# builds need no network and leave no wheels in any layer.
#
# Environment: TAG (default latest), BASE_IMAGE (default: the local base),
# PIP (default .venv/bin/pip), DOCKER (default docker), IMAGES (default: all four),
# TORCH_INDEX_URL (the GPU worker: e.g. https://download.pytorch.org/whl/cu128 with
# TAG=<version>-cuda and BASE_IMAGE=python:3.11-slim; docs/images.md).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${TAG:-latest}"
PIP="${PIP:-.venv/bin/pip}"
IMAGES="${IMAGES:-worker airflow sqs postgres}"
if [[ -z "${DOCKER:-}" ]]; then
    DOCKER=docker
    # BuildKit is needed (RUN --mount). A Docker CLI without its buildx plugin cannot
    # use it; Debian's docker.io client (/usr/bin/docker) has BuildKit built in.
    if ! docker buildx version >/dev/null 2>&1 && [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; fi
fi
export DOCKER DOCKER_BUILDKIT=1

if [[ -z "${BASE_IMAGE:-}" ]]; then
    BASE_IMAGE=chunk-ops-base:bookworm
    images/base/build.sh "$BASE_IMAGE" >/dev/null
fi

seconds() { date +%s; }
build() {  # name, extra docker build arguments...
    local name="$1"; shift
    local start; start="$(seconds)"
    "$DOCKER" build --progress=plain -f "images/$name/Dockerfile" -t "chunk-ops-$name:$TAG" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" "$@" . >"build/logs/$name.log" 2>&1 \
        || { tail -n 40 "build/logs/$name.log" >&2; echo "building chunk-ops-$name failed; log: build/logs/$name.log" >&2; exit 1; }
    local size; size="$("$DOCKER" image inspect -f '{{.Size}}' "chunk-ops-$name:$TAG")"
    printf 'chunk-ops-%s:%s  %d MB  %d s\n' "$name" "$TAG" "$((size / 1000000))" "$(( $(seconds) - start ))"
}

mkdir -p build/wheelhouse build/dist build/logs
echo "wheels: pinned requirements -> build/wheelhouse, chunk-ops -> build/dist" >&2
quiet_pip() { "$PIP" "$@" --quiet --disable-pip-version-check 2> >(grep -v "^WARNING: Location" >&2); }
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    # GPU variant: the pinned torch from PyTorch's CUDA index (with its nvidia-* wheels)
    rm -f build/wheelhouse/torch-*.whl
    quiet_pip wheel "$(grep -E '^torch==' requirements.txt)" --index-url "$TORCH_INDEX_URL" \
        --extra-index-url https://pypi.org/simple -w build/wheelhouse
else
    rm -f build/wheelhouse/torch-*+cu*.whl
fi
quiet_pip wheel -r requirements.txt -w build/wheelhouse
rm -f build/dist/chunk_ops-*.whl
quiet_pip wheel --no-deps -w build/dist .

for name in $IMAGES; do
    case "$name" in
        worker)   build worker ;;
        airflow)  build airflow --build-arg "WORKER_IMAGE=chunk-ops-worker:$TAG" ;;
        sqs)      build sqs ;;
        postgres) build postgres --network host ;;  # apt-get reaches the Debian mirror
        *) echo "unknown image $name (worker, airflow, sqs, postgres)" >&2; exit 2 ;;
    esac
done
