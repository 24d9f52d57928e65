#!/usr/bin/env bash
# Installs what clusterkv needs to build, test and run on Debian 12, idempotently: only the
# missing packages are installed, with sudo when not root. The CUDA toolkit is optional and
# never installed here (the CUDA backend is built when /usr/local/cuda or nvcc is present).
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config git ca-certificates
  libzmq3-dev libprotobuf-c-dev protobuf-c-compiler liburing-dev libcriterion-dev
  libopenblas-dev libpcre2-dev
  python3 python3-pip
)
# Extra packages for benchmarks and evaluation plots: deploy/install-deps.sh --bench
if [[ "${1:-}" == "--bench" ]]; then
  PACKAGES+=(fio gnuplot-nox)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
  SUDO="sudo"
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
