"""A tiny fake Hugging Face Hub on loopback: just enough of the Hub's HTTP API for huggingface_hub's
`snapshot_download` (also with `dry_run=True`) to list, size and download a model repo.

    with FakeHub() as hub:
        sha = hub.add_repo("Org/Tiny", model_dir)          # every file of model_dir, as one commit on main
        env["HF_ENDPOINT"] = hub.url                       # huggingface_hub reads it at import: use a subprocess
        ...
        assert hub.file_gets("Org/Tiny") == {"config.json": 1, ...}

Routes (what huggingface_hub 2.x calls; read from its source):
    GET  /api/models/{repo}[/revision/{rev}]            -> {"id", "sha", "siblings": [{"rfilename"}], ...}
    GET  /api/models/{repo}/tree/{rev}[/{path}]?recursive=True
                                                        -> [{"type": "file", "path", "size", "oid"[, "lfs"]}, ...]
    HEAD /{repo}/resolve/{rev}/{path}                   -> X-Repo-Commit, ETag (git blob sha1), Content-Length;
                                                           for LFS files also X-Linked-Etag (sha256), X-Linked-Size
    GET  /{repo}/resolve/{rev}/{path}                   -> the bytes, same headers
Errors carry the X-Error-Code huggingface_hub maps to its exceptions: RepoNotFound (404),
RevisionNotFound (404), EntryNotFound (404, with X-Repo-Commit). No Xet headers are ever sent, so
downloads take the plain HTTP path. `rev` may be a branch, a tag or a 40-hex commit sha.

Every request is logged (method, path, repo, revision, file, wall-clock time) so tests can assert
what was asked for, in which order, and that each file was fetched exactly once. `hold_downloads()`
makes file GETs wait until `release_downloads()`, to hold a download open while other processes race.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
LFS_MIN_BYTES = 10 * 2**20  # the Hub stores big files in LFS whatever their suffix

_API = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)??)(?:/(?P<kind>revision|tree)/(?P<rest>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    path: str
    data: bytes
    git_oid: str  # what the Hub sends as ETag for a regular file, and as "oid" in the tree
    sha256: str

    @classmethod
    def of(cls, path: str, data: bytes) -> HubFile:
        return cls(path, data, git_blob_sha1(data), hashlib.sha256(data).hexdigest())

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def is_lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_BYTES

    @property
    def etag(self) -> str:
        """The etag huggingface_hub keys its blob cache on: sha256 for LFS files, git sha1 otherwise."""
        return self.sha256 if self.is_lfs else self.git_oid


@dataclass
class HubRepo:
    repo_id: str
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)  # sha -> path -> file

    def commit_of(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # URL path, still quoted
    query: dict
    status: int
    at: float  # time.time() when the request arrived
    route: str  # "info" | "tree" | "file" | "other"
    repo: str | None = None
    revision: str | None = None  # as it appeared in the URL (branch, tag or sha)
    file: str | None = None


class FakeHub:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._gate: threading.Event | None = None
        self.first_file_get = threading.Event()
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release_downloads()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- content -----------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: Path | dict[str, bytes],
        *,
        branch: str | None = "main",
        tags: tuple[str, ...] = (),
        sha: str | None = None,
    ) -> str:
        """Add one commit holding `files` (a directory, read recursively, or path -> bytes); point
        `branch` (None: no branch) and `tags` at it. Returns the commit sha (40 hex)."""
        if isinstance(files, Path):
            root = files
            files = {
                p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted(root.rglob("*"))
                if p.is_file() and not p.name.endswith(".lock")
            }
        entries = {path: HubFile.of(path, data) for path, data in sorted(files.items())}
        if sha is None:
            digest = hashlib.sha1(repo_id.encode())
            for entry in entries.values():
                digest.update(entry.path.encode() + b"\0" + entry.git_oid.encode())
            sha = digest.hexdigest()
        assert re.fullmatch(r"[0-9a-f]{40}", sha), sha
        with self._lock:
            repo = self.repos.setdefault(repo_id, HubRepo(repo_id))
            repo.commits[sha] = entries
            for ref in ((branch,) if branch else ()) + tuple(tags):
                repo.refs[ref] = sha
        return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, HubFile]:
        repo = self.repos[repo_id]
        return repo.commits[repo.commit_of(revision)]

    def total_bytes(self, repo_id: str, revision: str = "main") -> int:
        return sum(f.size for f in self.files(repo_id, revision).values())

    # -- observation -------------------------------------------------------------------------
    def log(self, *, route: str | None = None, method: str | None = None, repo: str | None = None) -> list[Request]:
        with self._lock:
            return [
                r for r in self.requests
                if (route is None or r.route == route) and (method is None or r.method == method)
                and (repo is None or r.repo == repo)
            ]

    def file_gets(self, repo_id: str | None = None) -> Counter:
        """file path -> number of (successful) GETs of its bytes."""
        return Counter(r.file for r in self.log(route="file", method="GET", repo=repo_id) if r.status == 200)

    def file_heads(self, repo_id: str | None = None) -> Counter:
        return Counter(r.file for r in self.log(route="file", method="HEAD", repo=repo_id))

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()
        self.first_file_get.clear()

    # -- holding downloads open --------------------------------------------------------------
    def hold_downloads(self) -> None:
        """From now on, file GETs wait (up to 60 s) until release_downloads()."""
        self._gate = threading.Event()

    def release_downloads(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub (httpx reuses connections)

    def log_message(self, format, *args) -> None:  # silence the per-request stderr line
        return None

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # -- routing ------------------------------------------------------------------------------
    def _serve(self, body: bool) -> None:
        arrived = time.time()
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        hub = self.fake_hub
        if (m := _API.match(split.path)) and self.command == "GET":
            repo_id, kind = m["repo"], m["kind"] or "revision"
            rest = m["rest"] if m["rest"] is not None else "main"
            route = "info" if kind == "revision" else "tree"
            revision, _, sub = rest.partition("/") if kind == "tree" else (rest, "", "")
            revision = unquote(revision)
            record = dict(repo=repo_id, revision=revision)
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found", route, arrived, query, record)
            sha = repo.commit_of(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", route, arrived, query,
                                   record)
            files = repo.commits[sha]
            if kind == "revision":
                payload = {
                    "_id": sha[:24], "id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                    "gated": False, "disabled": False, "tags": [], "lastModified": "2024-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": path} for path in files],
                }
            else:
                payload = self._tree(files, unquote(sub), query.get("recursive", ["False"])[0].lower() == "true")
            return self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body,
                              Request("GET", split.path, query, 200, arrived, route, **record))
        if (m := _RESOLVE.match(split.path)) and self.command in ("GET", "HEAD"):
            repo_id, revision, path = m["repo"], unquote(m["rev"]), unquote(m["path"])
            record = dict(repo=repo_id, revision=revision, file=path)
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found", "file", arrived, query, record)
            sha = repo.commit_of(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", "file", arrived, query,
                                   record)
            entry = repo.commits[sha].get(path)
            if entry is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", "file", arrived,
                                   query, record, {"X-Repo-Commit": sha})
            headers = {
                "Content-Type": "application/octet-stream",
                "X-Repo-Commit": sha,
                "ETag": f'"{entry.git_oid}"',
                "Accept-Ranges": "bytes",
            }
            if entry.is_lfs:
                headers["X-Linked-Etag"] = f'"{entry.sha256}"'
                headers["X-Linked-Size"] = str(entry.size)
            if body:
                hub.first_file_get.set()
                gate = hub._gate
                if gate is not None:
                    gate.wait(timeout=60)
            return self._send(200, entry.data, headers, body,
                              Request(self.command, split.path, query, 200, arrived, "file", **record))
        return self._error(404, None, "Not found", "other", arrived, query, {})

    @staticmethod
    def _tree(files: dict[str, HubFile], under: str, recursive: bool) -> list[dict]:
        prefix = f"{under.strip('/')}/" if under.strip("/") else ""
        out: list[dict] = []
        folders: set[str] = set()
        for path, entry in files.items():
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):  # the folders on the way, as the Hub lists them
                folder = prefix + "/".join(parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    out.append({"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode()), "size": 0})
            if len(parts) > 1 and not recursive:
                continue
            item = {"type": "file", "path": path, "size": entry.size, "oid": entry.git_oid}
            if entry.is_lfs:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
            out.append(item)
        return out

    # -- responses ----------------------------------------------------------------------------
    def _send(self, status: int, payload: bytes, headers: dict[str, str], body: bool, request: Request) -> None:
        self.fake_hub._record(request)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _error(self, status, code, message, route, arrived, query, record, extra=None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, self.command != "HEAD",
                   Request(self.command, urlsplit(self.path).path, query, status, arrived, route, **record))
