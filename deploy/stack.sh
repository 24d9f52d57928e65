#!/usr/bin/env bash
# The served stack on one host: ckv-kvstore + ckv-router + one ckv-worker (docs/OPERATIONS.md).
#
#   deploy/stack.sh start  [--config FILE]   start what is not running; wait until the worker
#                                            registered at the router
#   deploy/stack.sh stop   [--config FILE]   SIGTERM in reverse order (worker, router, store),
#                                            SIGKILL after 10 s
#   deploy/stack.sh status [--config FILE]   pids, and the router's request/worker counts
#   deploy/stack.sh restart [--config FILE]
#
# Settings: deploy/stack.conf (run directory, binaries, config files, extra options).
# Everything lands in the run directory (mode 0700): the ipc:// sockets, <daemon>.pid, and
# logs/<daemon>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=${1:-}
shift || true
conf=deploy/stack.conf
while [ $# -gt 0 ]; do
    case "$1" in
    --config) conf=$2; shift 2 ;;
    *) echo "stack.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -r "$conf" ] || { echo "stack.sh: cannot read $conf" >&2; exit 2; }

# `name value` lines (value optionally in double quotes) into variables S_<name>.
declare -A S=([run-dir]=/tmp/ckv [bin-dir]=build/bin [kvstore]=yes
    [kvstore-conf]=deploy/kvstore.conf [router-conf]=deploy/router.conf
    [worker-conf]=deploy/worker.conf [kvstore-args]="" [router-args]="" [worker-args]=""
    [start-timeout-s]=120)
while IFS= read -r line || [ -n "$line" ]; do
    line=${line#"${line%%[![:space:]]*}"}
    case "$line" in ''|'#'*) continue ;; esac
    name=${line%%[[:space:]]*}
    value=${line#"$name"}
    value=${value#"${value%%[![:space:]]*}"}
    value=${value%\"}
    value=${value#\"}
    [ -n "${S[$name]+x}" ] || { echo "stack.sh: $conf: unknown setting '$name'" >&2; exit 2; }
    S[$name]=$value
done < "$conf"

run=${S[run-dir]}
bin=${S[bin-dir]}
logs=$run/logs

pid_of() { # prints the pid of a running daemon, or nothing
    local f=$run/$1.pid
    [ -r "$f" ] || return 0
    local p
    p=$(cat "$f")
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then echo "$p"; fi
}

start_one() { # name binary conf extra-args...
    local name=$1 binary=$2 cfg=$3
    shift 3
    if [ -n "$(pid_of "$name")" ]; then
        echo "$name: already running (pid $(pid_of "$name"))"
        return 0
    fi
    [ -x "$bin/$binary" ] || { echo "stack.sh: $bin/$binary not built (deploy/build.sh)" >&2; exit 1; }
    # shellcheck disable=SC2086
    setsid "$bin/$binary" --config "$cfg" --run-dir "$run" --log-file "$logs/$name.log" "$@" \
        </dev/null >>"$logs/$name.log" 2>&1 &
    echo $! > "$run/$name.pid"
    echo "$name: started (pid $!), log $logs/$name.log"
}

wait_path() { # path seconds name
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        [ -e "$1" ] && return 0
        [ -n "$(pid_of "$3")" ] || { echo "stack.sh: $3 exited; see $logs/$3.log" >&2; tail -5 "$logs/$3.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "stack.sh: $3 did not come up in $2 s; see $logs/$3.log" >&2
    exit 1
}

router_stats() {
    "$bin/ckv" stats --endpoint "ipc://$run/router.sock" --timeout-ms 2000 2>/dev/null
}

do_start() {
    mkdir -p "$run" "$logs"
    chmod 700 "$run" "$logs"
    local wargs=()
    if [ "${S[kvstore]}" = yes ]; then
        # shellcheck disable=SC2086
        start_one kvstore ckv-kvstore "${S[kvstore-conf]}" ${S[kvstore-args]}
        wait_path "$run/kvstore.sock" 60 kvstore
        wargs=(--kvstore-endpoint "ipc://$run/kvstore.sock")
    fi
    # shellcheck disable=SC2086
    start_one router ckv-router "${S[router-conf]}" ${S[router-args]}
    wait_path "$run/router.sock" 30 router
    # shellcheck disable=SC2086
    start_one worker ckv-worker "${S[worker-conf]}" "${wargs[@]}" ${S[worker-args]}
    local i
    for ((i = 0; i < ${S[start-timeout-s]} * 4; i++)); do
        if router_stats | grep -q '^workers:[1-9]'; then
            echo "stack: up; clients: ckv generate --router ipc://$run/router.sock -p TEXT"
            return 0
        fi
        [ -n "$(pid_of worker)" ] || { echo "stack.sh: the worker exited; see $logs/worker.log" >&2; tail -5 "$logs/worker.log" >&2; exit 1; }
        sleep 0.25
    done
    echo "stack.sh: the worker did not register in ${S[start-timeout-s]} s; see $logs/worker.log" >&2
    exit 1
}

stop_one() {
    local name=$1 p i
    p=$(pid_of "$name")
    if [ -z "$p" ]; then
        rm -f "$run/$name.pid"
        return 0
    fi
    kill -TERM "$p" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$p" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$p" 2>/dev/null; then
        echo "$name: still running after 10 s: SIGKILL"
        kill -KILL "$p" 2>/dev/null || true
    fi
    rm -f "$run/$name.pid"
    echo "$name: stopped"
}

do_stop() {
    stop_one worker
    stop_one router
    stop_one kvstore
}

do_status() {
    local rc=0 name p
    for name in kvstore router worker; do
        p=$(pid_of "$name")
        if [ -n "$p" ]; then
            echo "$name: running (pid $p)"
        elif [ "$name" = kvstore ] && [ "${S[kvstore]}" != yes ]; then
            echo "$name: not used"
        else
            echo "$name: stopped"
            rc=3
        fi
    done
    if [ -n "$(pid_of router)" ]; then
        router_stats | grep -E '^(waiting|running|requests|done|failed|rejected|workers):|^worker_[^:]*:model=' || true
    fi
    return $rc
}

case "$cmd" in
start) do_start ;;
stop) do_stop ;;
status) do_status ;;
restart) do_stop; do_start ;;
*) echo "usage: deploy/stack.sh start|stop|status|restart [--config FILE]" >&2; exit 2 ;;
esac
