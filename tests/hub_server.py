"""A small Hugging Face Hub on 127.0.0.1 for tests: just enough of the HTTP protocol to push and pull model repos.

Speaks what huggingface_hub's `create_repo`, `create_commit` / `upload_folder` (with `HF_HUB_DISABLE_XET=1`),
`hf_hub_download`, `snapshot_download`, `model_info`, `list_repo_files` / `list_repo_tree`, `list_repo_commits`,
`ModelCard.load` and transformers' `from_pretrained` send. Storage is in memory. As on the Hub:

* `create_repo` makes an "initial commit" holding `.gitattributes`;
* preupload answers "lfs" for files with an LFS suffix (`.safetensors`, `.png`, ...), binary files (a NUL byte in the
  first 512 bytes) and files above `lfs_threshold` bytes (10 MiB as on the Hub; lower it to test with text files):
  those go through the git-LFS batch API and a PUT to an upload URL, and the commit only references them by oid;
* a commit is atomic: if any operation is invalid (e.g. an LFS object that was never uploaded) nothing changes;
* the preupload answer carries each existing file's oid, so the client leaves unchanged files out of the commit.

Inspect the state in assertions with `server.repos["org/name"].commits[-1].added`, `.files`, `repo.read(path)`;
set `server.fail_next_commit` / `server.fail_next_lfs_upload` to make the next commit / LFS upload fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".png", ".jpg", ".jpeg", ".gif", ".npz", ".onnx")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
_REPO = r"(?P<repo>[^/]+/[^/]+)"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def front_matter(text: str) -> dict:
    """The YAML metadata block of a model card (`{}` if it has none); raises `yaml.YAMLError` or `ValueError`."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    data = yaml.safe_load(match.group(1)) if match else None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"the metadata block must be a mapping, got {type(data).__name__}")
    return data or {}


@dataclass(frozen=True)
class StoredFile:
    """One file of a revision: `content` and whether it is stored through git-LFS."""

    content: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @property
    def blob_id(self) -> str:
        """Git blob id: of the content for a regular file, of the LFS pointer for an LFS file."""
        data = self.pointer if self.lfs else self.content
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    @property
    def oid(self) -> str:
        """What preupload reports and the client compares with its local file: sha256 for LFS, blob id otherwise."""
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Commit:
    """One commit: `files` is the whole tree after it, `added` / `deleted` the paths this commit touched."""

    oid: str
    title: str
    message: str
    parent: str | None
    files: dict[str, StoredFile]
    added: list[str]
    deleted: list[str]
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    """A model repository: its commits (oldest first), branches (name -> commit oid) and uploaded LFS objects."""

    repo_id: str
    private: bool = False
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    created: str = field(default_factory=_now)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch name or a commit oid points to, or None."""
        oid = self.branches.get(revision, revision)
        return next((commit for commit in reversed(self.commits) if commit.oid == oid), None)

    def read(self, path: str, revision: str = "main") -> bytes:
        """The content of `path` at `revision` (raises KeyError if either is missing)."""
        return self.resolve(revision).files[path].content


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer(ThreadingHTTPServer):
    """The in-memory Hub; `start()` serves it from a daemon thread, `url` is the endpoint to put in `HF_ENDPOINT`.

    Example:
        >>> from huggingface_hub import HfApi
        >>> with HubServer() as hub:  # doctest: +SKIP
        ...     api = HfApi(endpoint=hub.url, token="dummy")
        ...     _ = api.create_repo("org/demo")
        ...     _ = api.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="org/demo")
        ...     assert hub.repos["org/demo"].read("a.txt") == b"hi"
    """

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, lfs_threshold: int = 10 * 2**20):
        super().__init__((host, port), _Handler)
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.log: list[str] = []  # "METHOD /path" of every request, in order
        self.fail_next_commit = False
        self.fail_next_lfs_upload = False
        self.lock = threading.RLock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        """Create `repo_id` with its initial commit (also what `POST /api/repos/create` does)."""
        repo = self.repos[repo_id] = Repo(repo_id, private=private)
        self.add_commit(
            repo, "main", {".gitattributes": StoredFile(GITATTRIBUTES, False)}, [".gitattributes"], "initial commit"
        )
        return repo

    def add_commit(self, repo: Repo, branch: str, files: dict, added: list, title: str, message: str = "") -> Commit:
        """Append a commit whose tree is `files` (path -> StoredFile) to `branch`, as a successful push would."""
        head = repo.resolve(branch)
        deleted = [path for path in (head.files if head else {}) if path not in files]
        seed = json.dumps([repo.repo_id, head and head.oid, title, len(repo.commits), sorted(files)]).encode()
        oid = hashlib.sha1(seed + b"".join(f.blob_id.encode() for f in files.values())).hexdigest()
        repo.commits.append(Commit(oid, title, message, head and head.oid, files, added, deleted))
        repo.branches[branch] = oid
        return repo.commits[-1]


_ROUTES: list[tuple[set[str], str, Callable]] = []


def _route(methods: str, pattern: str) -> Callable:
    """Serve `methods` (space-separated) on paths that fully match `pattern`; its named groups become arguments."""

    def register(handler: Callable) -> Callable:
        _ROUTES.append((set(methods.split()), pattern, handler))
        return handler

    return register


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: HubServer

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    # ---- plumbing -------------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        method, url = self.command, urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        body = self._read_body()
        self.server.log.append(f"{method} {url.path}")
        for methods, pattern, handler in _ROUTES:
            match = re.fullmatch(pattern, url.path)
            if match and method in methods:
                args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                try:
                    with self.server.lock:
                        return self._send(*handler(self, body, **args))
                except (HubError, KeyError, ValueError, TypeError) as exc:  # a malformed request: 400 (not retried)
                    error = exc if isinstance(exc, HubError) else HubError(400, f"cannot handle this request: {exc!r}")
                    headers = {"X-Error-Message": error.message, **error.headers}
                    headers |= {"X-Error-Code": error.code} if error.code else {}
                    return self._send(error.status, {"error": error.message}, headers)
        self._send(404, {"error": f"{method} {url.path} is not served by the test hub"})

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch  # noqa: N815  (http.server names its handlers so)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _require_token(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Unauthorized: a token is needed to write (set HF_TOKEN)")

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.server.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.server.repos[repo_id]

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ---- endpoints ------------------------------------------------------------------------------------------------

    @_route("POST", r"/api/repos/create")
    def create_repo(self, body: bytes):
        self._require_token()
        request = json.loads(body)
        if request.get("type", "model") != "model":
            raise HubError(400, "the test hub serves model repos only")
        repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
        url = f"{self.server.url}/{repo_id}"
        if repo_id in self.server.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}  # the client reads "url"
        self.server.create_repo(repo_id, private=request.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id}, {}

    @_route("POST", r"/api/validate-yaml")
    def validate_yaml(self, body: bytes):
        try:
            front_matter(json.loads(body)["content"])
        except (yaml.YAMLError, ValueError) as error:
            return 400, {"errors": [{"message": f"Invalid YAML in README.md: {error}"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    @_route("GET", r"/api/whoami-v2")
    def whoami(self, body: bytes):
        self._require_token()
        return 200, {"type": "user", "name": "user", "orgs": [], "auth": {"accessToken": {"role": "write"}}}, {}

    @_route("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)")
    def preupload(self, body: bytes, repo: str, rev: str):
        self._require_token()
        files = self._commit(self._repo(repo), rev).files
        answers = []
        for item in json.loads(body)["files"]:
            binary = b"\0" in base64.b64decode(item["sample"])
            lfs = binary or item["size"] > self.server.lfs_threshold or item["path"].lower().endswith(LFS_SUFFIXES)
            existing = files.get(item["path"])
            answers.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                | {"oid": existing.oid if existing else None}
            )
        return 200, {"files": answers}, {}

    @_route("POST", rf"/{_REPO}\.git/info/lfs/objects/batch")
    def lfs_batch(self, body: bytes, repo: str):
        self._require_token()
        stored, request = self._repo(repo).lfs_objects, json.loads(body)
        if request.get("operation") != "upload":
            raise HubError(400, "the test hub's LFS batch API only serves uploads (download through /resolve)")
        objects = []
        for obj in request["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in stored:  # already uploaded objects get no actions: the client skips them
                href = f"{self.server.url}/lfs-upload/{repo}/{obj['oid']}"
                answer["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    @_route("PUT", rf"/lfs-upload/{_REPO}/(?P<oid>[0-9a-f]{{64}})")
    def lfs_upload(self, body: bytes, repo: str, oid: str):
        if self.server.fail_next_lfs_upload:
            self.server.fail_next_lfs_upload = False
            raise HubError(403, "simulated failure of an LFS upload (server.fail_next_lfs_upload)")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"the uploaded content does not hash to its LFS oid {oid}")
        self._repo(repo).lfs_objects[oid] = body
        return 200, b"", {}

    @_route("POST", rf"/lfs-upload/{_REPO}/(?P<oid>[0-9a-f]{{64}})/verify")
    def lfs_verify(self, body: bytes, repo: str, oid: str):
        request, stored = json.loads(body), self._repo(repo).lfs_objects.get(oid)
        if stored is None or request["oid"] != oid or request["size"] != len(stored):
            raise HubError(404, f"LFS object {oid} was not uploaded")
        return 200, {}, {}

    @_route("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)")
    def commit(self, body: bytes, repo: str, rev: str):
        self._require_token()
        target = self._repo(repo)
        if self.query.get("create_pr"):
            raise HubError(400, "the test hub does not support pull requests (create_pr)")
        head = self._commit(target, rev)
        if rev not in target.branches:
            raise HubError(400, f"can only commit to a branch, not to {rev}")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header, files, added = lines[0]["value"], dict(head.files), []
        if header.get("parentCommit") not in (None, head.oid):
            raise HubError(412, f"A commit has happened since parentCommit {header['parentCommit']}")
        for line in lines[1:]:  # applied to a copy of the tree: an invalid operation leaves the repo untouched
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                content = target.lfs_objects.get(value["oid"])
                if content is None or value.get("size", len(content)) != len(content):
                    raise HubError(400, f"Your push was rejected: LFS object {value['oid']} was never uploaded")
                files[value["path"]] = StoredFile(content, lfs=True)
            elif key in ("deletedFile", "deletedFolder"):
                prefix = value["path"].rstrip("/") + "/"
                gone = [p for p in files if p == value["path"] or (key == "deletedFolder" and p.startswith(prefix))]
                if not gone:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                for path in gone:
                    del files[path]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
            added += [value["path"]] if key in ("file", "lfsFile") else []
        if self.server.fail_next_commit:
            self.server.fail_next_commit = False
            raise HubError(500, "simulated failure of a commit (server.fail_next_commit)")
        added = [path for path in dict.fromkeys(added) if path in files]
        new = self.server.add_commit(target, rev, files, added, header["summary"], header.get("description", ""))
        url = f"{self.server.url}/{repo}/commit/{new.oid}"
        return 200, {"success": True, "commitOid": new.oid, "commitUrl": url, "pullRequestUrl": None}, {}

    @_route("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?")
    def model_info(self, body: bytes, repo: str, rev: str = "main"):
        target = self._repo(repo)
        commit = self._commit(target, rev)
        siblings = [_entry(path, file, sibling=True) for path, file in sorted(commit.files.items())]
        try:
            card = front_matter(commit.files["README.md"].content.decode()) if "README.md" in commit.files else {}
        except (yaml.YAMLError, ValueError):
            card = {}
        info = {"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.oid, "siblings": siblings}
        info |= {"lastModified": commit.date, "createdAt": target.created, "private": target.private, "gated": False}
        info |= {"tags": card.get("tags") or [], "pipeline_tag": card.get("pipeline_tag"), "cardData": card or None}
        info["library_name"] = card.get("library_name")  # `pipeline(model=...)` refuses anything but transformers/timm
        return 200, info, {}

    @_route("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")
    def tree(self, body: bytes, repo: str, rev: str, path: str = ""):
        files = self._commit(self._repo(repo), rev).files
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        below = {p[len(prefix) :]: f for p, f in files.items() if p.startswith(prefix)}
        if prefix and not below:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        recursive = self.query.get("recursive", "false").lower() in ("true", "1")
        folders = {"/".join(rest.split("/")[: i + 1]) for rest in below for i in range(rest.count("/"))}
        entries = [_folder(prefix + d) for d in sorted(folders) if recursive or "/" not in d]
        entries += [_entry(prefix + p, f) for p, f in sorted(below.items()) if recursive or "/" not in p]
        return 200, entries, {}

    @_route("GET", rf"/api/models/{_REPO}/commits/(?P<rev>[^/]+)")
    def commits(self, body: bytes, repo: str, rev: str):
        target = self._repo(repo)
        commit, history = self._commit(target, rev), []
        while commit is not None:
            history.append({"id": commit.oid, "title": commit.title, "message": commit.message, "date": commit.date})
            history[-1]["authors"] = [{"user": "user"}]
            commit = target.resolve(commit.parent) if commit.parent else None
        return 200, history, {}

    @_route("GET HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
    def resolve(self, body: bytes, repo: str, rev: str, path: str):
        commit = self._commit(self._repo(repo), rev)
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        file = commit.files[path]
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit.oid}
        headers["ETag"] = f'"{file.oid}"'
        if file.lfs:  # the Hub answers LFS files with the linked object's etag and size (as a redirect to its CDN)
            headers |= {"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": file.size}
        return 200, file.content, headers


def _entry(path: str, file: StoredFile, sibling: bool = False) -> dict:
    lfs = {"oid": file.sha256, "size": file.size, "pointerSize": len(file.pointer)} if file.lfs else None
    if sibling:  # the shape of `siblings` in model_info
        extra = {"lfs": lfs | {"sha256": file.sha256}} if lfs else {}
        return {"rfilename": path, "size": file.size, "blobId": file.blob_id} | extra
    return {"type": "file", "path": path, "size": file.size, "oid": file.blob_id} | ({"lfs": lfs} if lfs else {})


def _folder(path: str) -> dict:
    return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}
