"""A local S3-compatible server (moto) on 127.0.0.1 standing in for OBS in the tests.

    with S3Server() as server:
        client = server.client()            # ObsClient signing v4, path style, as the moto server needs
        os.environ.update(server.env())     # what obs_sync reads
    with WatchProxy(server.port, watch) as proxy:   # proxy.endpoint: every request line seen, any refused
        ...

moto's server mishandles the SDK's default 'obs' and 'v2' signatures on a few requests in a thousand
(HTTP 500), so the tests sign with v4 and put the bucket in the path.
"""
import logging
import re
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable

from moto.server import ThreadedMotoServer
from obs import ObsClient

ACCESS_KEY = "AKTESTOBSSYNC0000001"
SECRET_KEY = "sk-test-obs-sync-Zr4Yq81pN3s0000001"  # fake; the tests check that it never shows up


class S3Server:
    def __init__(self) -> None:
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.port = 0
        self.running = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Server":
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self._moto.start()
        self.port = self._moto.get_host_and_port()[1]
        self.running = True
        # moto keeps its buckets in process-wide state: start every server empty.
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request) as response:
            response.read()
        return self

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        self._moto.stop()
        # ThreadedMotoServer.stop() leaves the listening socket open: clients would then wait in the
        # kernel's backlog until their timeout instead of being refused at once.
        self._moto._server.server_close()

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Environment for `src.model_utils.obs_sync` to reach this server quickly."""
        return {
            "OBS_ENDPOINT": self.endpoint,
            "OBS_ACCESS_KEY_ID": ACCESS_KEY,
            "OBS_SECRET_ACCESS_KEY": SECRET_KEY,
            "OBS_SIGNATURE": "v4",
            "OBS_REGION": "us-east-1",
            "OBS_PATH_STYLE": "1",
            "OBS_RETRY_BASE_DELAY": "0.01",
        }

    def client(self) -> ObsClient:
        return ObsClient(access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, server=self.endpoint,
                         signature="v4", region="us-east-1", path_style=True)

    def create_bucket(self, bucket: str, objects: dict[str, bytes] | None = None) -> None:
        client = self.client()
        try:
            response = client.createBucket(bucket)
            assert response.status < 300, f"createBucket {bucket}: HTTP {response.status}"
            for key, data in (objects or {}).items():
                response = client.putContent(bucket, key, data)
                assert response.status < 300, f"putContent {key}: HTTP {response.status}"
        finally:
            client.close()

    def list_keys(self, bucket: str) -> dict[str, bytes]:
        """Every object of `bucket`, key -> bytes."""
        client = self.client()
        try:
            response = client.listObjects(bucket)
            assert response.status < 300, f"listObjects {bucket}: HTTP {response.status}"
            objects = {}
            for item in response.body.contents:
                got = client.getObject(bucket, item.key, loadStreamInMemory=True)
                assert got.status < 300, f"getObject {item.key}: HTTP {got.status}"
                objects[item.key] = got.body.buffer or b""
            return objects
        finally:
            client.close()


class _Relay:
    """TCP relay on 127.0.0.1 in front of a server; subclasses look at the bytes going each way."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # lets the accept loop notice `closed`
        self.port = self._listener.getsockname()[1]
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
        self._thread.join()

    def close(self) -> None:
        self.closed.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        self._listener.close()
        for sock in sockets:
            _drop(sock)

    def _accept_loop(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._relay, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._relay, args=(upstream, client, True), daemon=True).start()

    def _relay(self, source: socket.socket, target: socket.socket, is_answer: bool) -> None:
        carry = b""
        try:
            while data := source.recv(65536):
                if is_answer:
                    data, last = self._answer(data)
                    target.sendall(data)
                    if last:
                        self.close()
                        return
                    continue
                if not self._request(carry, data):
                    _drop(source)
                    _drop(target)
                    return
                carry = (carry + data)[-_CARRY:]
                target.sendall(data)
        except OSError:
            pass

    def _answer(self, data: bytes) -> tuple[bytes, bool]:
        """The bytes to pass on of the next bytes of an answer, and whether to close every connection then."""
        return data, False

    def _request(self, carry: bytes, data: bytes) -> bool:
        """Whether to pass on `data` (the next bytes of a connection's requests; `carry`: the ones before)."""
        return True


_CARRY = 1024  # a request line split between two reads is still seen whole
_REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n")


def _drop(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class CutProxy(_Relay):
    """Relay that, once `cut_after` bytes of answers went through, drops every connection mid-stream and
    stops listening: a server that dies in the middle of a body.

    (Stopping moto itself cannot do this: its request threads finish the answer they are sending.)"""

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        super().__init__(upstream_port)
        self._budget = cut_after
        self.cut = self.closed

    def _answer(self, data: bytes) -> tuple[bytes, bool]:
        with self._lock:
            data = data[:self._budget]
            self._budget -= len(data)
            return data, self._budget <= 0


class WatchProxy(_Relay):
    """Relay that records every request line ("GET /bucket/key") in `requests` and shows it to `watch`;
    when `watch` returns False the request is not passed on and its connection is dropped: a client
    killed, or a network cut, at a request of the test's choosing."""

    def __init__(self, upstream_port: int, watch: Callable[[str], bool] | None = None) -> None:
        super().__init__(upstream_port)
        self.watch = watch
        self.requests: list[str] = []

    def _request(self, carry: bytes, data: bytes) -> bool:
        for match in _REQUEST_LINE.finditer(carry + data):
            if match.end() <= len(carry):
                continue  # seen with the previous read
            line = f"{match.group(1).decode()} {urllib.parse.unquote(match.group(2).decode())}"
            with self._lock:
                self.requests.append(line)
            if self.watch is not None and not self.watch(line):
                return False
        return True
