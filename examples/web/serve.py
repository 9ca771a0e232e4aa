"""Serve the web example on 127.0.0.1 with a bundle beside it.

    python examples/web/serve.py BUNDLE [--port 8000]
    open http://127.0.0.1:8000/web/?bundle=/bundle/

Serves examples/ (the page under /web/, onnxruntime-web under /node_modules/) and the bundle directory
under /bundle/. Only 127.0.0.1 is bound. Standard library only.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import os
import sys
import threading

EXAMPLES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json", ".onnx": "application/octet-stream", ".bin": "application/octet-stream"}


class Handler(http.server.SimpleHTTPRequestHandler):
    """examples/ at /, each of `mounts` ({url prefix: directory}) at its prefix."""

    mounts: dict[str, str] = {}

    def translate_path(self, path: str) -> str:
        clean = path.split("?", 1)[0].split("#", 1)[0]
        for prefix, directory in self.mounts.items():
            if clean.startswith(prefix):
                rel = clean[len(prefix):]
                return super().translate_path("/" + rel).replace(self.directory, directory, 1)
        return super().translate_path(path)

    def guess_type(self, path):
        return TYPES.get(os.path.splitext(path)[1], None) or super().guess_type(path)

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, fmt, *args):  # quiet: tests read stderr only on failure
        pass


def start(mounts: dict[str, str], port: int = 0) -> http.server.ThreadingHTTPServer:
    """Start a server in a daemon thread; returns it (`server.server_address[1]` is the port)."""
    handler = type("BoundHandler", (Handler,), {"mounts": {p: os.path.abspath(d) for p, d in mounts.items()}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(handler, directory=EXAMPLES))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--port", type=int, default=8000)
    a = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(a.bundle, "edgeseq.json")):
        print(f"error: {a.bundle}: not an edgeseq bundle (no edgeseq.json)", file=sys.stderr)
        return 1
    if not os.path.isdir(os.path.join(EXAMPLES, "node_modules", "onnxruntime-web")):
        print("error: onnxruntime-web missing: cd examples && npm ci", file=sys.stderr)
        return 1
    server = start({"/bundle/": a.bundle}, a.port)
    print(f"http://127.0.0.1:{server.server_address[1]}/web/?bundle=/bundle/  (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
