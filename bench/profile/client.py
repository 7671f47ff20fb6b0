#!/usr/bin/env python3
"""Sends N `tools/call` requests of `echo` on one keep-alive connection and reads each answer
whole. Usage: client.py small|mid|big|add N [port]  (mid: a 100 KB argument; big: 1 MB; add: `add` of two
small integers that vary, as `bench --target` sends it). $API_KEY: sent as x-api-key."""
import http.client, json, os, sys, time
MODE, N = sys.argv[1], int(sys.argv[2])
PORT = int(sys.argv[3]) if len(sys.argv) > 3 else 18080
text = {"big": "a" * 1_000_000, "mid": "a" * 100_000}.get(MODE, "hi")
H = {"content-type": "application/json", "accept": "application/json, text/event-stream",
     "mcp-protocol-version": "2025-06-18"}
if os.environ.get("API_KEY"):
    H["x-api-key"] = os.environ["API_KEY"]
c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=600)
t0 = time.time()
for i in range(N):
    body = json.dumps({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call",
                       "params": {"name": "add", "arguments": {"a": i % 100, "b": i % 7}}
                       if MODE == "add" else
                       {"name": "echo", "arguments": {"text": text}}},
                      separators=(",", ":")).encode()
    c.request("POST", "/mcp", body=body, headers=H)
    r = c.getresponse()
    data = r.read()
    if i == 0 or r.status != 200:
        print("status", r.status, dict(r.getheaders()), "len", len(data), data[:200], data[-60:], flush=True)
        if r.status != 200:
            sys.exit(1)
print("done", N, "in", round(time.time() - t0, 2), "s; last len", len(data))
