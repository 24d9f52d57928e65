#!/usr/bin/env bash
# Configures and builds clusterkv into build/ (binaries in build/bin/). Extra CMake flags come
# from CKV_CMAKE_FLAGS, e.g. CKV_CMAKE_FLAGS="-DCKV_SANITIZE=address,undefined".
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${CKV_BUILD_DIR:-build}"
# shellcheck disable=SC2086
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="${CKV_BUILD_TYPE:-RelWithDebInfo}" ${CKV_CMAKE_FLAGS:-} >/dev/null
cmake --build "$BUILD_DIR" -j"$(nproc)"
