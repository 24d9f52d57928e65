#!/usr/bin/env bash
# README command 1: installs what is missing, builds, and runs the main job on its default.
# Until the engine lands (issue 4) the most real thing that works is the built CLI itself.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
deploy/build.sh
exec "${CKV_BUILD_DIR:-build}/bin/ckv" version
