"""What the mock model servers share: the request log ($MOCK_LOG), JSON
answers, a chunked event stream (so a slow reply really trickles), and
serving on 127.0.0.1 with "LISTENING <port>" on stdout."""
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def logger(default_name):
    """A function that appends one JSON line per call to $MOCK_LOG
    (default ./<default_name>)."""
    path = os.environ.get("MOCK_LOG", os.path.join(os.getcwd(), default_name))

    def log(entry):
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    return log


def parse_json(raw):
    try:
        return json.loads(raw or b"{}")
    except Exception:
        return {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send_json(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_body(self):
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def start_events(self, headers=()):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def event(self, name, obj):
        chunk = ("event: %s\ndata: %s\n\n" % (name, json.dumps(obj))).encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.flush()

    def end_events(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def serve(handler):
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    srv = ThreadingHTTPServer(("127.0.0.1", port), handler)
    print("LISTENING", srv.server_address[1], flush=True)
    srv.serve_forever()
