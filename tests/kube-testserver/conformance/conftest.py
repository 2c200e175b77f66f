"""Shared fixtures for the kube-testserver conformance suite.

The suite states what the real kube-apiserver 1.32 does; it is run against the test server
binary named by $KUBE_TESTSERVER_BIN. One server is started per test session (the `server`
fixture); tests isolate themselves with unique namespaces (`ns`) and unique names (`uniq`).
Every wait has a deadline (`wait_for`), every watch is bounded by `timeoutSeconds` and a client
read timeout, and every process and temp dir is cleaned up also when a test fails.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlencode

import pytest
import urllib3
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
DEFAULT_BIN = REPO / "target" / "debug" / "kube-testserver"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"

# Published into every namespace by kube-controller-manager's root-ca-cert-publisher.
ROOT_CA = "kube-root-ca.crt"

SERVE_LINE = re.compile(r"^serving (https://\S+) \(kubeconfig (\S+), context (\S+)\)")


# --------------------------------------------------------------------------------------------
# small helpers


def uniq(prefix: str = "t") -> str:
    """A DNS-1123 label unique to this call."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_for(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05, msg: str = ""):
    """Polls `pred` until it returns a truthy value (returned) or `timeout` passes (fails)."""
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - the predicate may fail until the condition holds
            last_exc = e
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            pytest.fail(f"condition not met within {timeout}s: {msg}{extra}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# the server process


@dataclass
class Server:
    url: str
    kubeconfig: str
    context: str
    dir: str
    token: str
    ca_file: str
    proc: subprocess.Popen
    http: urllib3.PoolManager = field(repr=False, default=None)

    # ---- raw HTTP ------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Optional[dict] = None,
        headers: Optional[dict] = None,
        content_type: str = "application/json",
        timeout: float = 20.0,
    ) -> "Resp":
        """One request; `body` is JSON-encoded unless it is bytes/str. Never raises on status."""
        url = self.url + path
        if query:
            url += ("&" if "?" in url else "?") + urlencode(query, doseq=True)
        h = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            if isinstance(body, (bytes, str)):
                data = body.encode() if isinstance(body, str) else body
            else:
                data = json.dumps(body).encode()
            h["Content-Type"] = content_type
        if headers:
            h.update(headers)
        r = self.http.request(
            method,
            url,
            body=data,
            headers=h,
            timeout=urllib3.Timeout(connect=5, read=timeout),
            retries=False,
            redirect=False,
        )
        return Resp(r.status, {k.lower(): v for k, v in r.headers.items()}, r.data, r.headers)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def put(self, path, body, **kw):
        return self.request("PUT", path, body, **kw)

    def patch(self, path, body, content_type="application/merge-patch+json", **kw):
        return self.request("PATCH", path, body, content_type=content_type, **kw)

    def delete(self, path, body=None, **kw):
        return self.request("DELETE", path, body, **kw)

    def watch(self, path: str, query: dict, max_seconds: float = 10.0) -> list:
        """A bounded watch: reads events until the server ends the stream (`timeoutSeconds`
        in `query` should make it do so) or `max_seconds` passes. Returns the parsed events."""
        return Watch(self, path, query, max_seconds).run_to_end()

    def watch_bg(self, path: str, query: dict, max_seconds: float = 10.0) -> "Watch":
        w = Watch(self, path, query, max_seconds)
        w.start()
        return w

    # ---- kubectl -------------------------------------------------------------------------

    def kubectl(self, *args: str, input: Optional[str] = None, check: bool = True,
                context: Optional[str] = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
        cmd = [KUBECTL, "--kubeconfig", self.kubeconfig, "--context", context or self.context,
               "--request-timeout", "20s", *args]
        env = dict(os.environ)
        env["HOME"] = self.dir  # kubectl's discovery/openapi cache stays in the server's dir
        env.pop("KUBECONFIG", None)
        p = subprocess.run(cmd, input=input, capture_output=True, text=True, env=env,
                           timeout=timeout)
        if check and p.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({p.returncode}):\n{p.stderr}{p.stdout}")
        return p

    def kubectl_json(self, *args: str, **kw) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json", **kw).stdout)


@dataclass
class Resp:
    status: int
    headers: dict
    data: bytes
    raw_headers: Any = None

    @property
    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def header_all(self, name: str) -> list:
        if self.raw_headers is None:
            return []
        return self.raw_headers.getlist(name)

    def __repr__(self) -> str:
        return f"Resp({self.status}, {self.text[:600]!r})"


class Watch:
    """A watch stream read on a background thread into `events` (dicts), bounded in time."""

    def __init__(self, server: Server, path: str, query: dict, max_seconds: float):
        self.server = server
        self.path = path
        self.query = dict(query)
        self.query.setdefault("watch", "true")
        self.max_seconds = max_seconds
        self.events: list = []
        self.status: Optional[int] = None
        self.body_prefix = b""
        self.error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._resp = None
        self._done = threading.Event()
        self._lock = threading.Lock()

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def run_to_end(self) -> list:
        self.start()
        self.join()
        return self.events

    def _run(self):
        srv = self.server
        url = srv.url + self.path + ("&" if "?" in self.path else "?") + urlencode(self.query)
        deadline = time.monotonic() + self.max_seconds
        try:
            r = srv.http.request(
                "GET", url,
                headers={"Authorization": f"Bearer {srv.token}", "Accept": "application/json"},
                preload_content=False, retries=False,
                timeout=urllib3.Timeout(connect=5, read=min(self.max_seconds, 5.0)),
            )
            self._resp = r
            self.status = r.status
            buf = b""
            while time.monotonic() < deadline:
                try:
                    chunk = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
                except Exception as e:  # read timeout or connection closed
                    if time.monotonic() < deadline and "timed out" in str(e).lower():
                        continue
                    break
                if not chunk:
                    break
                buf += chunk
                if r.status != 200:
                    continue
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        with self._lock:
                            self.events.append(json.loads(line))
            if r.status != 200:
                self.body_prefix = buf[:4000]
            elif buf.strip():
                try:
                    with self._lock:
                        self.events.append(json.loads(buf))
                except ValueError:
                    self.body_prefix = buf[:4000]
        except Exception as e:  # noqa: BLE001
            self.error = e
        finally:
            try:
                if self._resp is not None:
                    self._resp.release_conn()
            except Exception:  # noqa: BLE001
                pass
            self._done.set()

    def join(self, timeout: Optional[float] = None):
        self._done.wait(timeout if timeout is not None else self.max_seconds + 10)
        return self

    def close(self):
        if self._resp is not None:
            try:
                self._resp.shutdown() if hasattr(self._resp, "shutdown") else self._resp.close()
            except Exception:  # noqa: BLE001
                pass
        self.join(5)

    def snapshot(self) -> list:
        with self._lock:
            return list(self.events)

    def wait_for(self, pred: Callable[[list], Any], timeout: float = 5.0, msg: str = "") -> list:
        """Waits until `pred(events)` holds; returns the events seen so far."""
        wait_for(lambda: pred(self.snapshot()), timeout, msg=msg or f"watch events {self.snapshot()!r}")
        return self.snapshot()

    @property
    def done(self) -> bool:
        return self._done.is_set()


def _start_server(name: str) -> Server:
    binary = os.environ.get("KUBE_TESTSERVER_BIN") or str(DEFAULT_BIN)
    if not os.path.exists(binary):
        pytest.exit(f"kube-testserver binary not found at {binary} (set KUBE_TESTSERVER_BIN)", 2)
    d = tempfile.mkdtemp(prefix=f"kts-conf-{name}-")
    log = open(os.path.join(d, "server.log"), "wb")
    proc = subprocess.Popen(
        [binary, "--cluster", name, "--dir", d, "--bind", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def pump():
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.decode(errors="replace"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 30
    m = None
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.05, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        m = SERVE_LINE.match(line.strip())
        if m:
            break
    if not m:
        _stop(proc)
        log.close()
        err = open(os.path.join(d, "server.log"), errors="replace").read()[-3000:]
        shutil.rmtree(d, ignore_errors=True)
        pytest.exit(f"kube-testserver did not print its serving line within 30 s:\n{err}", 2)
    url, kubeconfig, context = m.group(1), m.group(2), m.group(3)
    with open(kubeconfig) as f:
        kc = yaml.safe_load(f)
    user = next(u["user"] for u in kc["users"] if u["name"] == context)
    cluster = next(c["cluster"] for c in kc["clusters"])
    ca_file = os.path.join(d, "conformance-ca.crt")
    with open(ca_file, "wb") as f:
        f.write(base64.b64decode(cluster["certificate-authority-data"]))
    http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=ca_file, maxsize=16)
    srv = Server(url=url, kubeconfig=kubeconfig, context=context, dir=d, token=user["token"],
                 ca_file=ca_file, proc=proc, http=http)
    srv._log = log  # type: ignore[attr-defined]
    return srv


def _die_with_parent():
    """In the child: ask Linux to SIGKILL it when pytest dies (even by SIGKILL)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the fixtures' teardown still stops it
        pass


def _stop(proc: subprocess.Popen):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)


def _teardown(srv: Server):
    _stop(srv.proc)
    try:
        srv._log.close()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        pass
    srv.http.clear()
    shutil.rmtree(srv.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def server():
    srv = _start_server("conf")
    try:
        yield srv
    finally:
        _teardown(srv)


@pytest.fixture(scope="module")
def own_server(request):
    """A server of the module's own, for tests whose state must not leak into others."""
    srv = _start_server("mod" + uuid.uuid4().hex[:6])
    try:
        yield srv
    finally:
        _teardown(srv)


@pytest.fixture(scope="session")
def api_client(server):
    from kubernetes import config

    client = config.new_client_from_config(config_file=server.kubeconfig, context=server.context)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def ns(server):
    """A fresh namespace for one test (deleted, best effort, afterwards)."""
    name = uniq("ns")
    r = server.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                           "metadata": {"name": name}})
    assert r.status == 201, r
    yield name
    server.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


# --------------------------------------------------------------------------------------------
# object builders


def cm(name: str, data: Optional[dict] = None, **meta) -> dict:
    md = {"name": name, **meta}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": md, "data": data or {"k": "v"}}


def pod(name: str, node: Optional[str] = None, image: str = "nginx:1.27", **spec) -> dict:
    s = {"containers": [{"name": "c", "image": image}], **spec}
    if node:
        s["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": s}


def svc(name: str, port: int = 80, **spec) -> dict:
    s = {"selector": {"app": name}, "ports": [{"name": "http", "port": port}], **spec}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": s}


def deployment(name: str, replicas: Optional[int] = None) -> dict:
    spec: dict = {
        "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": {"app": name}},
                     "spec": {"containers": [{"name": "c", "image": "nginx:1.27"}]}},
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}, "spec": spec}


def status_of(resp: Resp) -> dict:
    """The `Status` body of an error response (fails if there is none)."""
    try:
        body = resp.json
    except ValueError:
        pytest.fail(f"expected a Status body, got {resp!r}")
    assert body.get("kind") == "Status", body
    return body


def assert_status(resp: Resp, code: int, reason: Optional[str] = None, msg: Optional[str] = None):
    assert resp.status == code, f"expected {code}, got {resp!r}"
    st = status_of(resp)
    assert st.get("code") == code, st
    assert st.get("status") == "Failure", st
    if reason is not None:
        assert st.get("reason") == reason, st
    if msg is not None:
        assert msg in st.get("message", ""), f"{msg!r} not in {st.get('message')!r}"
    return st


def write(dirpath: Path, name: str, text: str) -> str:
    p = Path(dirpath) / name
    p.write_text(text)
    return str(p)
