#!/usr/bin/env bash
# The gateway's CPU per request on one path, natively or counted by callgrind.
#
#   bench/profile/profile.sh cpu GATEWAY UPSTREAM_MODE CLIENT_MODE N
#       CPU time (user + system, from /proc) and minor page faults of the gateway over N
#       requests, per request.
#       GATEWAY `nginx` measures nginx (one worker, tuned as `cargo xtask bench` tunes it) on
#       the same path instead: the peer, in the same conditions.
#   bench/profile/profile.sh callgrind GATEWAY UPSTREAM_MODE CLIENT_MODE N OUT_DIR
#       Instructions of the gateway's worker over N requests (counters zeroed after a
#       warm-up): repeatable whatever else the machine does. Run twice with different N and
#       divide the difference of the totals by the difference of N.
#
# UPSTREAM_MODE: small | mid | big | bigsse | bigssechunked (upstream.py); CLIENT_MODE: small | mid | big |
# add (client.py). Example, the 1 MB event-stream answer: profile.sh cpu target/release/gateway
# bigsse small 1000. POLICY=1: the gateway applies the realistic policy (policy-config.sh) and
# the client sends its API key; with `add`, the path the headline's policy rows measure.
# Ports 18080, 18081 and 18090 on loopback must be free.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kind=$1 gw=$2 up_mode=$3 client_mode=$4 n=$5
[ "$gw" = nginx ] || gw=$(realpath "$gw")
python3 "$here/upstream.py" "$up_mode" >/dev/null 2>&1 &
up=$!
out=${6:-}
config="$here/config.toml"
if [ "${POLICY:-0}" = 1 ]; then
    config=$(mktemp --suffix .toml)
    "$here/policy-config.sh" >"$config"
    export API_KEY=bench-api-key-0123456789
fi
if [ "$kind" = callgrind ]; then
    mkdir -p "$out"
    valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$out/cg.%p.out" \
        "$gw" run --config "$config" >"$out/gateway.log" 2>&1 &
elif [ "$gw" = nginx ]; then
    dir=$(mktemp -d)
    sed "s|@DIR@|$dir|g" "$here/nginx.conf" >"$dir/nginx.conf"
    nginx -c "$dir/nginx.conf" -p "$dir" >/dev/null 2>&1 &
else
    "$gw" run --config "$config" >/dev/null 2>&1 &
fi
gwpid=$!
trap 'kill -KILL $gwpid $up 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    python3 -c 'import socket; socket.create_connection(("127.0.0.1", 18080), 1)' 2>/dev/null && break
    sleep 0.2
done
python3 "$here/client.py" "$client_mode" 5 >/dev/null
if [ "$kind" = callgrind ]; then
    callgrind_control -z "$gwpid" >/dev/null
    python3 "$here/client.py" "$client_mode" "$n"
    callgrind_control -d after "$gwpid" >/dev/null
    total=$(callgrind_annotate "$(ls "$out"/cg.*.out.1-02 | head -1)" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "worker instructions over $n requests: $total (files in $out; the worker is *.1-02)"
else
    # CPU time (user + system, user) and minor page faults of the process so far.
    cpu() { awk '{print $14 + $15, $14, $10}' "/proc/$gwpid/stat"; }
    read -r a au af <<<"$(cpu)"
    python3 "$here/client.py" "$client_mode" "$n" >/dev/null
    read -r b bu bf <<<"$(cpu)"
    tck=$(getconf CLK_TCK)
    echo "$up_mode answer, $client_mode request: $(((b - a) * 1000000 / tck / n)) us CPU per request (user $(((bu - au) * 1000000 / tck / n))), $(((bf - af) / n)) page faults, over $n"
fi
