#!/usr/bin/env bash
# Prints echo.toml with the realistic policy of `cargo xtask bench proxy` (`bench
# --print-policy`: API key identity, tool and argument rules, rates, budgets, the loop breaker)
# in place of its [kernel] table, the route asking for an API key. Requests through it carry
# `x-api-key: bench-api-key-0123456789` (API_KEY below). Used by echo.sh and profile.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
policy=$("$root/target/release/bench" --print-policy)
awk -v policy="$policy" '/^\[kernel\]$/ { print policy; skip = 1; next }
    skip && /^\[/ { skip = 0 } !skip { print } END { print "auth = [\"api_key\"]" }' \
    "$here/echo.toml"
