"""A loopback HTTP server standing for storage.googleapis.com in the download tests (no test reaches the internet).

It serves the bytes it is given, with range requests (206 + Content-Range), GCS's `x-goog-hash: md5=...`
(or an md5 ETag) and knobs a test turns per path: `cut` (send that many bytes of the body, then close),
`corrupt` (flip one byte of what is sent, the stated md5 staying the true one), `status` (answer with that
HTTP status), `delay` (seconds before answering), `chunk_delay` (seconds between 64 KiB chunks), `no_range` (ignore
Range: always the whole file, 200). Every GET
is recorded as (path, Range header).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import re
import socket
import threading
import time
from urllib.parse import unquote


class FakeGCS:
    def __init__(self, header: str = 'x-goog-hash'):
        self.files: dict[str, bytes] = {}
        self.knobs: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.header = header  # 'x-goog-hash', 'etag' or None (no checksum: the size alone)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def do_GET(self):
                server._get(self)

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def put(self, path: str, data: bytes, **knobs) -> None:
        self.files[path] = data
        self.knobs[path] = knobs

    def gets(self, path: str) -> list[str]:
        """The Range headers ('' for none) of the GETs of `path`."""
        return [r for p, r in self.requests if p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _get(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = unquote(h.path.split('?')[0])
        rng = h.headers.get('Range') or ''
        self.requests.append((path, rng))
        knobs = self.knobs.get(path, {})
        if knobs.get('delay'):
            time.sleep(knobs['delay'])
        if path not in self.files or knobs.get('status'):
            status = knobs.get('status') or 404
            h.send_response(status)
            h.send_header('Content-Length', '0')
            h.end_headers()
            return
        data = self.files[path]
        start = 0
        m = None if knobs.get('no_range') else re.fullmatch(r'bytes=(\d+)-', rng)
        if m:
            start = int(m.group(1))
            if start >= len(data):
                h.send_response(416)
                h.send_header('Content-Length', '0')
                h.end_headers()
                return
        body = data[start:]
        if knobs.get('corrupt'):
            i = len(data) // 2 - start
            if 0 <= i < len(body):
                body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
        h.send_response(206 if m else 200)
        if m:
            h.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        h.send_header('Content-Length', str(len(body)))
        h.send_header('Accept-Ranges', 'bytes')
        md5 = hashlib.md5(data).digest()
        if self.header == 'x-goog-hash':
            h.send_header('x-goog-hash', 'crc32c=AAAAAA==')
            h.send_header('x-goog-hash', 'md5=' + base64.b64encode(md5).decode())
        elif self.header == 'etag':
            h.send_header('ETag', f'"{md5.hex()}"')
        h.end_headers()
        cut = knobs.pop('cut', None)  # once: the next request gets the whole rest
        send = body if cut is None else body[:cut]
        for i in range(0, len(send), 1 << 16):
            if knobs.get('chunk_delay'):
                time.sleep(knobs['chunk_delay'])
            try:
                h.wfile.write(send[i:i + (1 << 16)])
                h.wfile.flush()
            except OSError:
                return
        if cut is not None:
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
