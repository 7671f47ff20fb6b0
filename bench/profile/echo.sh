#!/usr/bin/env bash
# CPU per `echo` request of one or more proxies under the same closed-loop load, pinned: the
# proxy on CPU 1, the load generator (`bench --target`) and `mcp-upstream` on CPU 0.
#
#   bench/profile/echo.sh BYTES SECONDS ROUNDS PROXY...
#       PROXY: a gateway binary (run with one worker, passthrough: echo.toml) or `nginx`
#       (bench/profile/nginx.conf). Each round runs every proxy in turn; one line per run:
#       requests per second and CPU (user + system, from /proc) per request.
#       BYTES 0: `add` instead of `echo`. $CONNECTIONS: instead of 32. POLICY=1: the gateway
#       applies the realistic policy of `cargo xtask bench proxy` (`bench --print-policy`: API
#       key identity, tool and argument rules, rates, budgets, the loop breaker) and every
#       request carries its API key.
#
# Example, the binary before a change against the one after and nginx, 1 MB, two rounds:
#   bench/profile/echo.sh 1000000 6 2 /tmp/gateway.before target/release/gateway nginx
# Needs target/release/bench and target/release/mcp-upstream (cargo build --release -p bench).
# Ports 18080, 18081 and 18090 on loopback must be free.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bytes=$1 seconds=$2 rounds=$3
shift 3
taskset -c 0 "$root/target/release/mcp-upstream" --listen 127.0.0.1:18090 --workers 1 >/dev/null 2>&1 &
up=$!
pid=
trap 'kill -KILL $up $pid 2>/dev/null || true' EXIT
tck=$(getconf CLK_TCK)
config="$here/echo.toml" header=()
if [ "${POLICY:-0}" = 1 ]; then
    config=$(mktemp --suffix .toml)
    "$here/policy-config.sh" >"$config"
    header=(--header "x-api-key: bench-api-key-0123456789")
fi
one() {
    # The last run's listener must be gone before the next binds.
    for _ in $(seq 100); do ss -ltnH 'sport = :18080' | grep -q . || break; sleep 0.1; done
    if [ "$1" = nginx ]; then
        dir=$(mktemp -d)
        sed "s|@DIR@|$dir|g" "$here/nginx.conf" >"$dir/nginx.conf"
        taskset -c 1 nginx -c "$dir/nginx.conf" -p "$dir" >/dev/null 2>&1 &
    else
        taskset -c 1 "$1" run --config "$config" >/dev/null 2>&1 &
    fi
    pid=$!
    for _ in $(seq 100); do
        python3 -c 'import socket; socket.create_connection(("127.0.0.1", 18080), 1)' 2>/dev/null && break
        sleep 0.1
    done
    sleep 0.5
    read -r a au <<<"$(awk '{print $14 + $15, $14}' "/proc/$pid/stat")"
    out=$(taskset -c 0 "$root/target/release/bench" --target 127.0.0.1:18080 --echo-bytes "$bytes" \
        --connections "${CONNECTIONS:-32}" --seconds "$seconds" "${header[@]}" 2>&1)
    read -r b bu <<<"$(awk '{print $14 + $15, $14}' "/proc/$pid/stat")"
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    rps=$(echo "$out" | grep -oE '^[0-9]+ rps' | grep -oE '[0-9]+' || echo 0)
    n=$(awk "BEGIN { print int($rps * $seconds) }")
    if [ "$n" -eq 0 ]; then
        echo "$1 echo $bytes B: no answers"
        echo "$out" | tail -3
        return
    fi
    echo "$1 echo $bytes B: $rps rps, $(((b - a) * 1000000 / tck / n)) us CPU per request (user $(((bu - au) * 1000000 / tck / n)))"
}
sleep 1
for _ in $(seq "$rounds"); do
    for p in "$@"; do
        one "$p"
    done
done
