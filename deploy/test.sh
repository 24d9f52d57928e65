#!/usr/bin/env bash
# README command 2: installs what is missing, builds, fetches the default model (the
# real-model tests need it: CKV_REQUIRE_MODEL=1 turns their skip into a failure) and runs the
# whole Criterion suite (build/bin/ckv-tests), whose summary line ends the output. Arguments go
# to ckv-tests (e.g. --filter 'config/*').
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
deploy/build.sh
deploy/fetch-model.sh >/dev/null
export CKV_REQUIRE_MODEL=1
exec "${CKV_BUILD_DIR:-build}/bin/ckv-tests" "$@"
