"""A local stand-in for the Hugging Face hub's read API, for tests that run the real download path.

Standard library only: two ThreadingHTTPServers on 127.0.0.1 (port 0), the hub and a "CDN".
Point HF_ENDPOINT at `HubServer.endpoint` and huggingface_hub talks to it as it talks to the hub:

    GET  /api/{models|datasets}/{repo}[/revision/{rev}]   repo info: id, sha, siblings
    GET  /api/{models|datasets}/{repo}/tree/{rev}[/path]  the tree listing (recursive=True: every file and folder)
    HEAD/GET /{repo}/resolve/{rev}/{path}                 a model repo's file
    HEAD/GET /datasets/{repo}/resolve/{rev}/{path}        a dataset repo's file
    GET  (CDN) /blobs/{sha256}                             the bytes of a large (LFS) file

As the hub answers: a small (git) file's resolve is the file itself, with X-Repo-Commit, its git blob
id as ETag and its Content-Length; a large (LFS) file's resolve is a 302 to the CDN, another origin
(its own port), carrying X-Repo-Commit, X-Linked-Etag (the sha256) and X-Linked-Size, which
huggingface_hub reads from the redirect itself before it GETs the Location. No X-Xet-* headers, so
downloads are plain HTTP. Range requests get 206 and Content-Range (how a cut download resumes).
An unknown repo is 401 RepoNotFound, an unknown revision 404 RevisionNotFound, an unknown file 404
EntryNotFound, with the X-Error-Code headers huggingface_hub turns into its exception types.

Every request is recorded (`requests`, and `connections` counts every TCP connection accepted, even
one that sends nothing), so a test can assert which files were fetched, or that nothing reached the
server at all. Faults, per file: `missing` answers 404 (EntryNotFound) at resolve although the tree
lists the file; `cut` sends the headers of the whole answer (its full Content-Length) and then
closes the connection once the body reaches the cut offset (half the file by default), so the file
can never be completed while the fault lasts; `times` limits either to that many requests.
`stall` makes the hub accept connections and never answer. `heal()` clears every fault.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# What the hub's .gitattributes stores in LFS (the subset these tests serve)
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".parquet", ".gz", ".model", ".arrow", ".h5")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    repo_type: str = "model"  # or "dataset"
    sha: str = ""  # the commit every revision name resolves to (default: derived from the files)

    def __post_init__(self):
        if not self.sha:
            digest = hashlib.sha1(self.repo_id.encode())
            for path in sorted(self.files):
                digest.update(path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
            self.sha = digest.hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def tree(self) -> list[dict]:
        """The /tree listing, recursive: folders, then every file with its git oid (and LFS pointer)."""
        folders = sorted({"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)})
        entries = [{"type": "directory", "oid": git_blob_id(f.encode()), "size": 0, "path": f} for f in folders]
        for path, data in sorted(self.files.items()):
            entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
            if self.is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # the URL path, unquoted, without the query
    query: str
    range: str | None
    repo_id: str | None = None  # for resolve and CDN requests: the repo file it is about
    filename: str | None = None


@dataclass
class _Fault:
    kind: str  # "missing" or "cut"
    times: int | None  # None: until healed
    cut_at: float = 0.5  # cut: a byte offset, or a fraction of the file


@dataclass
class HubServer:
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    stalled: bool = False

    def __post_init__(self):
        self._lock = threading.Lock()
        self._faults: dict[tuple[str, str], _Fault] = {}
        self._blobs: dict[str, tuple[Repo, str]] = {}  # sha256 -> (repo, path): what the CDN serves
        self._release = threading.Event()  # set: stalled handlers give up
        self._hub = self._server("hub")
        self._cdn = self._server("cdn")

    # setup ---------------------------------------------------------------------------------------

    def add(self, repo: Repo) -> Repo:
        with self._lock:
            self.repos[(repo.repo_type, repo.repo_id)] = repo
            for path, data in repo.files.items():
                if repo.is_lfs(path):
                    self._blobs[hashlib.sha256(data).hexdigest()] = (repo, path)
        return repo

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    # faults --------------------------------------------------------------------------------------

    def missing(self, repo_id: str, filename: str, times: int | None = None) -> None:
        """Answer 404 (EntryNotFound) for this file's resolve, though the tree still lists it."""
        with self._lock:
            self._faults[(repo_id, filename)] = _Fault("missing", times)

    def cut(self, repo_id: str, filename: str, times: int | None = None, at: float = 0.5) -> None:
        """Send this file's headers (its whole length) and close the connection once the body
        reaches `at` (a byte offset, or a fraction of the file): no request gets the bytes past it."""
        with self._lock:
            self._faults[(repo_id, filename)] = _Fault("cut", times, at)

    def stall(self) -> None:
        """Accept connections and never answer (a hub behind a proxy that hangs)."""
        self.stalled = True
        self._release.clear()

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()
        self.stalled = False
        self._release.set()

    def _take_fault(self, repo_id: str, filename: str, kind: str) -> _Fault | None:
        with self._lock:
            fault = self._faults.get((repo_id, filename))
            if fault is None or fault.kind != kind:
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[(repo_id, filename)]
            return fault

    # what was asked ------------------------------------------------------------------------------

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.connections = 0

    def fetched(self, repo_id: str | None = None) -> set[str]:
        """The repo files whose bytes were asked for (a GET of the file itself or of its CDN blob)."""
        with self._lock:
            return {r.filename for r in self.requests if r.method == "GET" and r.filename is not None
                    and (repo_id is None or r.repo_id == repo_id)
                    and (r.server == "cdn" or not self._is_lfs(r.repo_id, r.filename))}  # fmt: skip

    def touched(self, repo_id: str | None = None) -> set[str]:
        """The repo files any request (HEAD, GET, on the hub or the CDN) was about."""
        with self._lock:
            return {r.filename for r in self.requests if r.filename is not None
                    and (repo_id is None or r.repo_id == repo_id)}  # fmt: skip

    def _is_lfs(self, repo_id: str, filename: str) -> bool:
        return any(repo.repo_id == repo_id and repo.is_lfs(filename) for repo in self.repos.values())

    # lifecycle -----------------------------------------------------------------------------------

    def _server(self, name: str) -> ThreadingHTTPServer:
        owner = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address):
                with owner._lock:
                    owner.connections += 1
                super().process_request(request, client_address)

        class Handler(_Handler):
            hub = owner
            server_name = name

        server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    def close(self) -> None:
        self._release.set()
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_API = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$")
_TREE = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    server_name: str
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub: a cut must close the connection itself

    def log_message(self, format, *args):  # quiet
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        split = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(split.path)
        record = Request(self.server_name, self.command, path, split.query, self.headers.get("Range"))
        with self.hub._lock:
            self.hub.requests.append(record)
        if self.server_name == "hub" and self.hub.stalled:
            self.hub._release.wait(timeout=600)
            self.close_connection = True
            return
        if self.server_name == "cdn":
            return self._cdn(path, record, body)
        if match := _TREE.match(path):
            kind, repo_id, revision, _ = match.groups()
            repo = self._repo(kind[:-1], repo_id, revision)
            return repo and self._json(repo.tree(), repo, body)
        if match := _API.match(path):
            kind, repo_id, revision = match.groups()
            repo = self._repo(kind[:-1], repo_id, revision or "main")
            info = repo and {"id": repo.repo_id, "_id": repo.sha[:24], "sha": repo.sha, "private": False,
                             "gated": False, "disabled": False, "tags": [], "lastModified": "2024-01-01T00:00:00.000Z",
                             "siblings": [{"rfilename": p} for p in sorted(repo.files)]}  # fmt: skip
            return repo and self._json(info, repo, body)
        if match := _RESOLVE.match(path):
            dataset, repo_id, revision, filename = match.groups()
            record.repo_id, record.filename = repo_id, filename
            repo = self._repo("dataset" if dataset else "model", repo_id, revision)
            return repo and self._resolve(repo, filename, body)
        self._error(404, None, "NotFound", "Not Found")

    def _repo(self, repo_type: str, repo_id: str, revision: str) -> Repo | None:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(401, None, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", repo.sha):
            self._error(404, repo, "RevisionNotFound", "Invalid rev id: " + revision)
            return None
        return repo

    def _resolve(self, repo: Repo, filename: str, body: bool) -> None:
        data = repo.files.get(filename)
        if data is None or self.hub._take_fault(repo.repo_id, filename, "missing"):
            return self._error(404, repo, "EntryNotFound", "Entry not found")
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes"}
        if repo.is_lfs(filename):
            sha256 = hashlib.sha256(data).hexdigest()
            location = f"{self.hub.cdn_endpoint}/blobs/{sha256}?filename={urllib.parse.quote(filename)}"
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data)), "Location": location})
            return self._send(302, headers, b"", body)
        self._file(repo, filename, data, headers, body)

    def _cdn(self, path: str, record: Request, body: bool) -> None:
        found = self.hub._blobs.get(path.removeprefix("/blobs/")) if path.startswith("/blobs/") else None
        if found is None:
            return self._send(404, {"Content-Type": "text/plain"}, b"NoSuchKey", body)
        repo, filename = found
        record.repo_id, record.filename = repo.repo_id, filename
        data = repo.files[filename]
        self._file(repo, filename, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"},
                   body)  # fmt: skip

    def _file(self, repo: Repo, filename: str, data: bytes, headers: dict, body: bool) -> None:
        start, end, status = 0, len(data) - 1, 200
        if body and (wanted := self.headers.get("Range")):
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if not match or int(match.group(1)) >= len(data):
                return self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
            start = int(match.group(1))
            end = min(int(match.group(2)), len(data) - 1) if match.group(2) else len(data) - 1
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
        part = data[start : end + 1]
        fault = self.hub._take_fault(repo.repo_id, filename, "cut") if body else None
        if fault is None:
            return self._send(status, {**headers, "Content-Type": "application/octet-stream"}, part, body)
        cut_at = fault.cut_at if isinstance(fault.cut_at, int) else int(len(data) * fault.cut_at)
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/octet-stream"}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(part)))  # the whole answer's length, then less
        self.end_headers()
        self.wfile.write(part[: max(0, cut_at - start)])
        self.wfile.flush()
        time.sleep(0.05)  # the bytes arrive before the close does
        self.close_connection = True

    def _json(self, value, repo: Repo, body: bool) -> None:
        payload = json.dumps(value).encode()
        self._send(200, {"Content-Type": "application/json", "X-Repo-Commit": repo.sha}, payload, body)

    def _error(self, status: int, repo: Repo | None, code: str, message: str) -> None:
        payload = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        if repo is not None:
            headers["X-Repo-Commit"] = repo.sha
        self._send(status, headers, payload, True)

    def _send(self, status: int, headers: dict, payload: bytes, body: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(payload)
