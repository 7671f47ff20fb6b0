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
#       PROXY may also be `floor` (the headline's byte relay, `bench --floor-listen`) or
#       `epoll:<gateway binary>` (the gateway on monoio's epoll driver instead of io_uring).
#       VETH=1: as the headline, the proxy and `mcp-upstream` in one network namespace and the
#       load in another, joined by a veth pair (198.18.0.1 is the proxy's side; needs root);
#       the namespaces are deleted on exit.
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
# In the proxy's and the load's namespaces (both the host's own unless VETH=1).
inp=() inl=() addr=127.0.0.1 up= pid= tag="echo$$"
cleanup() {
    kill -KILL $up $pid 2>/dev/null || true
    if [ "${VETH:-0}" = 1 ]; then
        ip netns del "${tag}p" 2>/dev/null || true
        ip netns del "${tag}l" 2>/dev/null || true
    fi
    rm -f "${listen:-}"
}
# Set before the namespaces are made, so that a step failing half-way leaves none behind.
trap cleanup EXIT
if [ "${VETH:-0}" = 1 ]; then
    ip netns add "${tag}p"
    ip netns add "${tag}l"
    ip link add "${tag}a" netns "${tag}p" type veth peer name "${tag}b" netns "${tag}l"
    ip -n "${tag}p" addr add 198.18.0.1/24 dev "${tag}a"
    ip -n "${tag}l" addr add 198.18.0.2/24 dev "${tag}b"
    for ns in p l; do
        ip -n "${tag}$ns" link set lo up
    done
    ip -n "${tag}p" link set "${tag}a" up
    ip -n "${tag}l" link set "${tag}b" up
    inp=(ip netns exec "${tag}p") inl=(ip netns exec "${tag}l") addr=198.18.0.1
fi
taskset -c 0 "${inp[@]}" "$root/target/release/mcp-upstream" --listen 127.0.0.1:18090 --workers 1 >/dev/null 2>&1 &
up=$!
tck=$(getconf CLK_TCK)
config="$here/echo.toml" header=()
if [ "${POLICY:-0}" = 1 ]; then
    config=$(mktemp --suffix .toml)
    "$here/policy-config.sh" >"$config"
    header=(--header "x-api-key: bench-api-key-0123456789")
fi
if [ "$addr" != 127.0.0.1 ]; then
    listen=$(mktemp --suffix .toml)
    sed "s|127.0.0.1:18080|$addr:18080|" "$config" >"$listen"
    config=$listen
fi
one() {
    # The last run's listener must be gone before the next binds.
    for _ in $(seq 100); do "${inp[@]}" ss -ltnH 'sport = :18080' | grep -q . || break; sleep 0.1; done
    case "$1" in
    nginx)
        dir=$(mktemp -d)
        sed "s|@DIR@|$dir|g; s|listen 127.0.0.1:18080|listen $addr:18080|" "$here/nginx.conf" >"$dir/nginx.conf"
        taskset -c 1 "${inp[@]}" nginx -c "$dir/nginx.conf" -p "$dir" >/dev/null 2>&1 &
        ;;
    floor)
        taskset -c 1 "${inp[@]}" "$root/target/release/bench" --floor-listen "$addr:18080" \
            --floor-upstream 127.0.0.1:18090 >/dev/null 2>&1 &
        ;;
    epoll:*)
        MONOIO_FORCE_LEGACY_DRIVER=1 taskset -c 1 "${inp[@]}" "${1#epoll:}" run --config "$config" >/dev/null 2>&1 &
        ;;
    *)
        taskset -c 1 "${inp[@]}" "$1" run --config "$config" >/dev/null 2>&1 &
        ;;
    esac
    pid=$!
    for _ in $(seq 100); do
        "${inl[@]}" python3 -c "import socket; socket.create_connection((\"$addr\", 18080), 1)" 2>/dev/null && break
        sleep 0.1
    done
    sleep 0.5
    read -r a au <<<"$(awk '{print $14 + $15, $14}' "/proc/$pid/stat")"
    s0=$(awk '/^cpu[01] /{printf "%s ", $9}' /proc/stat)
    out=$(taskset -c 0 "${inl[@]}" "$root/target/release/bench" --target "$addr:18080" --echo-bytes "$bytes" \
        --connections "${CONNECTIONS:-32}" --seconds "$seconds" "${header[@]}" 2>&1)
    read -r b bu <<<"$(awk '{print $14 + $15, $14}' "/proc/$pid/stat")"
    s1=$(awk '/^cpu[01] /{printf "%s ", $9}' /proc/stat)
    # The share of each core the hypervisor gave to another guest: a run with much is the host's.
    stolen=$(echo "$s0 $s1" | awk -v t="$tck" -v s="$seconds" '{printf "%.0f%% / %.0f%%", 100*($3-$1)/t/s, 100*($4-$2)/t/s}')
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    rps=$(echo "$out" | grep -oE '^[0-9]+ rps' | grep -oE '[0-9]+' || echo 0)
    n=$(awk "BEGIN { print int($rps * $seconds) }")
    if [ "$n" -eq 0 ]; then
        echo "$1 echo $bytes B: no answers"
        echo "$out" | tail -3
        return
    fi
    echo "$1 echo $bytes B: $rps rps, $(((b - a) * 1000000 / tck / n)) us CPU per request (user $(((bu - au) * 1000000 / tck / n))), stolen $stolen"
}
sleep 1
for _ in $(seq "$rounds"); do
    for p in "$@"; do
        one "$p"
    done
done
