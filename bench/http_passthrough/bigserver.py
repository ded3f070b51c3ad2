"""A sink/source HTTP upstream for the streaming part of the benchmark.

``GET /big?bytes=N`` answers N bytes generated on the fly; ``POST``/``PUT``
read and discard the request body and answer how many bytes arrived.  Nothing
touches the disk and nothing is held in memory, so the only process whose
memory grows with the body is the proxy in between.

    python bigserver.py PORT
"""

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CHUNK = b"\0" * (1024 * 1024)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        query = parse_qs(urlsplit(self.path).query)
        size = int(query.get("bytes", ["1024"])[0])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        left = size
        while left > 0:
            n = min(left, len(CHUNK))
            self.wfile.write(CHUNK[:n])
            left -= n

    def do_POST(self):
        left = int(self.headers.get("Content-Length", "0"))
        received = 0
        while left > 0:
            data = self.rfile.read(min(left, 1024 * 1024))
            if not data:
                break
            received += len(data)
            left -= len(data)
        body = f'{{"received": {received}}}'.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_POST


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()
