#!/usr/bin/env bash
# README command 1: installs what is missing, builds, fetches the default model once (into the
# model cache, sha256-checked), then runs the project end to end as it is deployed: the served
# stack on this host (ckv-kvstore + ckv-router + one ckv-worker, deploy/stack.sh), one request
# sent through the router with `ckv generate` (a default question in the model's chat template,
# decoded with ClusterKV, streamed back, then the timings), and the stack stopped again.
#
#   deploy/run.sh [ckv generate options]     e.g. -p "Once upon a time" -n 64 --method full
#   deploy/run.sh --embedded [ckv run options]   the engine in this process instead (ckv run)
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
deploy/build.sh
deploy/fetch-model.sh >/dev/null
bin="${CKV_BUILD_DIR:-build}/bin"

if [ "${1:-}" = "--embedded" ]; then
    shift
    exec "$bin/ckv" run "$@"
fi

prompt="In two sentences: why do long contexts make LLM decoding slow, and how can attention be made cheaper?"
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
    args=(--chat -p "$prompt" -n 96 --temp 0.7 --top-p 0.9 --seed 7)
fi

stopped=0
stop_stack() {
    if [ $stopped -eq 0 ]; then
        stopped=1
        deploy/stack.sh stop >&2 || true
    fi
}
trap stop_stack EXIT
echo "run.sh: starting the stack (deploy/stack.sh start; logs in the run directory)" >&2
deploy/stack.sh start >&2
echo "run.sh: ckv generate ${args[*]}" >&2
"$bin/ckv" generate "${args[@]}"
