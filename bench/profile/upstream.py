#!/usr/bin/env python3
"""A keep-alive HTTP/1.1 upstream that answers every request alike, for profiling one path
of the gateway at a time. Usage: upstream.py small|mid|big|bigsse|bigssechunked [port]
  small: a small JSON answer; mid: a 100 KB JSON answer; big: a 1 MB JSON answer (Content-Length);
  bigsse: the 1 MB answer as one event (Content-Length); bigssechunked: the same, chunked
  in 64 KiB chunks, as uvicorn sends an SDK server's event."""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = sys.argv[1] if len(sys.argv) > 1 else "small"
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 18090
BIG = "a" * 1_000_000

def body_for(rid):
    text = BIG if MODE in ("big", "bigsse", "bigssechunked") else BIG[:100_000] if MODE == "mid" else "ok"
    return json.dumps({"jsonrpc": "2.0", "id": rid,
                       "result": {"content": [{"type": "text", "text": text}]}},
                      separators=(",", ":")).encode()

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # As uvicorn: TCP_NODELAY, and the head and the body in two writes.
    disable_nagle_algorithm = True
    def log_message(self, *a):
        pass
    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        data = self.rfile.read(n) if n else b""
        try:
            req = json.loads(data)
            rid = req.get("id", 1)
        except Exception:
            rid = 1
        if rid is None:  # notification
            self.send_response(202); self.send_header("content-length", "0"); self.end_headers(); return
        body = body_for(rid)
        if MODE == "bigssechunked":
            body = b"event: message\ndata: " + body + b"\n\n"
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            # As uvicorn writes an event: one chunk each (here in 64 KiB chunks).
            out = bytearray()
            for i in range(0, len(body), 65536):
                piece = body[i:i + 65536]
                out += b"%x\r\n" % len(piece) + piece + b"\r\n"
            out += b"0\r\n\r\n"
            self.wfile.write(bytes(out))
            return
        if MODE == "bigsse":
            body = b"event: message\ndata: " + body + b"\n\n"
            ctype = "text/event-stream"
        else:
            ctype = "application/json"
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.send_response(405); self.send_header("content-length", "0"); self.end_headers()
    def do_DELETE(self):
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", PORT), H).serve_forever()
