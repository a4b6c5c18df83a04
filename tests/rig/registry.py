"""Debian's ``docker-registry`` (CNCF Distribution 2.8) as a child process on loopback.

One config writer for every use: the tests' upstream (anonymous, or with an ``auth:``
section for htpasswd or token auth, see :mod:`tests.rig.auth`), bench's upstream and
bench's peer, which is Distribution's own pull-through mode (:func:`proxy_section`).
Storage is the filesystem driver in the work dir; ``stop()`` then ``start()`` comes back
on the same port with the same storage. The log file holds both the access log (stdout,
Combined Log Format, which bench counts) and the application log (stderr).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from .process import ChildProcess, LoopbackAddress, free_port

REGISTRY_BINARY = "/usr/bin/docker-registry"

REGISTRY_CONFIG = """\
version: 0.1
log:
  level: {log_level}
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: false
"""


def proxy_section(remote_url: str) -> str:
    """The top-level ``proxy:`` section: pull-through from ``remote_url``."""
    return f"proxy:\n  remoteurl: {remote_url}\n"


class Registry(ChildProcess, LoopbackAddress):
    """``docker-registry serve`` on a fixed loopback port.

    ``extra`` is YAML text appended to the generated config: top-level sections such as
    ``auth:`` or ``proxy:``. Ready means ``GET /v2/`` answers 200, or 401 when ``auth:``
    is configured (it then answers 200 to no one anonymous).
    """

    name = "docker-registry"

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str = REGISTRY_BINARY,
        log_level: str = "info",
        extra: str = "",
    ) -> None:
        super().__init__(workdir, log_name="registry.log")
        self.binary = binary
        self.root = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.port = free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        config = REGISTRY_CONFIG.format(root=self.root, port=self.port, log_level=log_level)
        self.config_path.write_text(config + extra)

    def argv(self) -> list[str]:
        return [self.binary, "serve", str(self.config_path)]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v2/", timeout=1) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as exc:
            return exc.code == 401  # up, with authentication configured
        except (urllib.error.URLError, OSError):
            return False

    def blob_path(self, digest: str) -> Path:
        """Where Distribution's filesystem driver keeps a blob's data."""
        hex_ = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()
