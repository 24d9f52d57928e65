#!/usr/bin/env bash
# README command 1: installs what is missing, builds, fetches the default model once (into the
# model cache, sha256-checked), and runs `ckv run` on it: a default question in the model's chat
# template, decoded with ClusterKV, streamed, then the speed and the time share of attention.
# Arguments go to `ckv run` (e.g. -p "Once upon a time" -n 64 --method full).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
deploy/build.sh
deploy/fetch-model.sh >/dev/null
exec "${CKV_BUILD_DIR:-build}/bin/ckv" run "$@"
