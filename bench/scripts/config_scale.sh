#!/bin/bash
# Configuration scale: RSS of a gateway started with $CONFIG (made by config_scale_gen.py), its
# time to ready, five reloads through the admin API (each timed) and RSS after them.
# Usage: python3 bench/scripts/config_scale_gen.py 100 1000 18555 18556 > /tmp/config-scale.toml
#        bench/scripts/config_scale.sh target/release/gateway LABEL
BIN=$1; LABEL=$2; P=18555; A=18556
rm -rf /tmp/config-scale-state
$BIN run --config ${CONFIG:-/tmp/config-scale.toml} > /tmp/config-scale-$LABEL.log 2>&1 &
PID=$!
T0=$(date +%s%N)
for i in $(seq 1 1500); do curl -sf http://127.0.0.1:$A/healthz >/dev/null && break; sleep 0.2; done
echo "$LABEL ready after $(( ($(date +%s%N)-T0)/1000000 )) ms"
sleep 1
echo "$LABEL start RSS KiB: $(grep VmRSS /proc/$PID/status)"
for i in 1 2 3 4 5; do
  s=$(date +%s%N); curl -sf -o /dev/null -w "%{http_code} " -X POST http://127.0.0.1:$A/reload >/dev/null; e=$(date +%s%N)
  echo "$LABEL reload $i: $(( (e-s)/1000000 )) ms"
done
sleep 1
echo "$LABEL after 5 reloads: $(grep VmRSS /proc/$PID/status)"
echo "$LABEL cpu ticks (utime stime): $(awk '{print $14, $15}' /proc/$PID/stat)"
kill $PID; wait $PID 2>/dev/null
