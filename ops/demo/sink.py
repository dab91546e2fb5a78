#!/usr/bin/env python3
"""A stand-in CRM and newsletter platform for the demo: a real HTTP server on loopback.

POST /clients -> 201 {"id", "name", ...}   (dedupes on Idempotency-Key, as real APIs do)
POST /issues  -> 202 {"scheduled": true, ...}
GET  /research -> 200 text
Every request is appended to the log file given as the second argument.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

seen = {}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, body, ctype="application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _log(self, body):
        with open(LOG, "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path,
                                "key": self.headers.get("Idempotency-Key"), "body": body}) + "\n")

    def do_GET(self):
        self._log(None)
        if self.path.startswith("/research"):
            self._send(200, "1. Ship the smallest loop first.\n2. Make state authoritative.\n", "text/plain")
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        self._log(body)
        key = self.headers.get("Idempotency-Key")
        if key in seen:
            return self._send(*seen[key])
        if self.path.startswith("/clients"):
            reply = (201, dict(body, id="crm-%d" % (len(seen) + 1)))
        elif self.path.startswith("/issues"):
            reply = (202, dict(body, scheduled=True))
        else:
            reply = (404, {"error": "not found"})
        if key:
            seen[key] = reply
        self._send(*reply)


if __name__ == "__main__":
    port, LOG = int(sys.argv[1]), sys.argv[2]
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
