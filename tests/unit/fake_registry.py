"""A small registry played by an aiohttp app, for unit tests of the upstream client and API.

It serves manifests (by tag and digest, GET and HEAD), blobs and tags/list, and can demand
Basic or Bearer authentication (its own token endpoint at ``/token``), redirect blobs
elsewhere, or answer every ``/v2/`` request with a fixed failure. Every request is
recorded with its headers, so tests assert on what the proxy actually sent.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.model import MEDIA_TYPE_OCI_MANIFEST, Digest

AUTH_NONE, AUTH_BASIC, AUTH_BEARER = "none", "basic", "bearer"


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]

    @property
    def authorization(self) -> str | None:
        return self.headers.get("Authorization")


@dataclass
class Failure:
    status: int
    headers: dict[str, str] = field(default_factory=dict)


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def manifest_body(label: str, media_type: str = MEDIA_TYPE_OCI_MANIFEST) -> bytes:
    """A small, valid-looking image manifest; ``label`` makes its digest unique."""
    config = Digest.of(label.encode())
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": str(config),
                "size": len(label),
            },
            "layers": [],
        }
    ).encode()


class FakeRegistry:
    def __init__(
        self,
        *,
        auth: str = AUTH_NONE,
        username: str | None = None,
        password: str | None = None,
        token_lifetime: int | None = 300,
    ) -> None:
        self.auth = auth
        self.credentials = basic(username, password or "") if username is not None else None
        self.token_lifetime = token_lifetime
        self.requests: list[Recorded] = []
        self.token_requests: list[Recorded] = []
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.blobs: dict[tuple[str, str], bytes] = {}
        self.tags: dict[str, list[str]] = {}
        self.tags_link: str | None = None
        self.blob_redirect: str | None = None
        """Base URL (another origin, or a path here) that blob GETs are redirected to."""
        self.failure: Failure | None = None
        self.lie_about_manifests = False
        self._issued: set[str] = set()

    # -- content ------------------------------------------------------------------------

    def add_manifest(
        self, repo: str, tag: str | None, body: bytes, media_type: str = MEDIA_TYPE_OCI_MANIFEST
    ) -> Digest:
        digest = Digest.of(body)
        self.manifests[(repo, str(digest))] = (media_type, body)
        if tag is not None:
            self.manifests[(repo, tag)] = (media_type, body)
        return digest

    def add_blob(self, repo: str, data: bytes) -> Digest:
        digest = Digest.of(data)
        self.blobs[(repo, str(digest))] = data
        return digest

    def v2_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith("/v2/")]

    # -- the app ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/v2/", self._base)
        app.router.add_route("*", "/v2/{tail:.+}", self._v2)
        app.router.add_route("*", "/moved/{tail:.+}", self._moved)
        return app

    def _record(self, request: web.Request, into: list[Recorded]) -> None:
        into.append(
            Recorded(
                request.method,
                request.path,
                dict(request.query),
                CIMultiDictProxy(CIMultiDict(request.headers)),
            )
        )

    def _challenge(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization")
        if self.auth == AUTH_BASIC:
            if header is not None and header == self.credentials:
                return None
            return web.Response(
                status=401, headers={"WWW-Authenticate": 'Basic realm="fake registry"'}
            )
        if self.auth == AUTH_BEARER:
            if header is not None and header.removeprefix("Bearer ") in self._issued:
                return None
            realm = f"http://{request.host}/token"
            return web.Response(
                status=401,
                headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="fake"'},
            )
        return None

    async def _token(self, request: web.Request) -> web.Response:
        self._record(request, self.token_requests)
        if self.credentials is not None and request.headers.get("Authorization") != (
            self.credentials
        ):
            return web.Response(status=401)
        token = f"token-{len(self.token_requests)}"
        self._issued.add(token)
        body: dict[str, object] = {"token": token}
        if self.token_lifetime is not None:
            body["expires_in"] = self.token_lifetime
        return web.json_response(body)

    async def _base(self, request: web.Request) -> web.StreamResponse:
        self._record(request, self.requests)
        return self._challenge(request) or web.json_response({})

    async def _v2(self, request: web.Request) -> web.StreamResponse:
        self._record(request, self.requests)
        refused = self._challenge(request)
        if refused is not None:
            return refused
        if self.failure is not None:
            return web.Response(status=self.failure.status, headers=self.failure.headers)
        tail = request.match_info["tail"]
        if tail.endswith("/tags/list"):
            return self._tags_list(request, tail.removesuffix("/tags/list"))
        for marker, handler in (("/manifests/", self._manifest), ("/blobs/", self._blob)):
            repo, found, reference = tail.rpartition(marker)
            if found:
                return handler(request, repo, reference)
        return web.Response(status=404)

    def _manifest(self, request: web.Request, repo: str, reference: str) -> web.Response:
        found = self.manifests.get((repo, reference))
        if found is None:
            return _error(404, "MANIFEST_UNKNOWN")
        media_type, body = found
        digest = Digest.of(body)
        if self.lie_about_manifests:
            body = body.replace(b"schemaVersion", b"schemaversion")
        return web.Response(
            body=body,
            headers={"Content-Type": media_type, "Docker-Content-Digest": str(digest)},
        )

    def _blob(self, request: web.Request, repo: str, reference: str) -> web.Response:
        data = self.blobs.get((repo, reference))
        if data is None:
            return _error(404, "BLOB_UNKNOWN")
        if self.blob_redirect is not None and request.method == "GET":
            raise web.HTTPTemporaryRedirect(f"{self.blob_redirect}/{repo}/{reference}")
        return web.Response(body=data, headers={"Docker-Content-Digest": reference})

    async def _moved(self, request: web.Request) -> web.Response:
        """A same-origin redirect target, like a registry's own blob storage path."""
        self._record(request, self.requests)
        repo, _, reference = request.match_info["tail"].rpartition("/")
        data = self.blobs.get((repo, reference))
        return web.Response(body=data) if data is not None else web.Response(status=404)

    def _tags_list(self, request: web.Request, repo: str) -> web.Response:
        tags = self.tags.get(repo)
        if tags is None:
            return _error(404, "NAME_UNKNOWN")
        headers = {"Link": self.tags_link} if self.tags_link else {}
        return web.json_response({"name": repo, "tags": tags}, headers=headers)


class BlobStorage:
    """Another origin that blob GETs are redirected to; records what reaches it."""

    def __init__(self, data: dict[str, bytes]) -> None:
        self.data = data
        self.requests: list[Recorded] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.+}", self._get)
        return app

    async def _get(self, request: web.Request) -> web.Response:
        self.requests.append(
            Recorded(
                request.method,
                request.path,
                dict(request.query),
                CIMultiDictProxy(CIMultiDict(request.headers)),
            )
        )
        digest = request.match_info["tail"].rpartition("/")[2]
        data = self.data.get(digest)
        return web.Response(body=data) if data is not None else web.Response(status=404)


def _error(status: int, code: str) -> web.Response:
    return web.json_response(
        {"errors": [{"code": code, "message": code.lower(), "detail": None}]}, status=status
    )
