"""nginx as a caching pull-through peer, set up the way rpardini's docker-registry-proxy
caches (the mirror users pick when they want speed), as a child process on loopback.

Debian's nginx (``nginx-light`` is the same binary since bookworm) with its own prefix and
configuration in the scratch directory, in the foreground (``-g 'daemon off;'``, so the
PID we hold is the master's and SIGTERM stops it and its workers), error log on stderr
(the child's log file), access log on (Combined Log Format, one file in the prefix).

What the configuration does, following rpardini's caching layer (written here, not
copied):

- one ``proxy_cache_path`` (``levels=1:2``, ``use_temp_path=off``: the temporary file is
  written inside the cache directory and renamed into place);
- ``proxy_cache_lock on`` with a generous ``proxy_cache_lock_timeout`` (880 s, as there),
  so concurrent misses wait for the first fetch instead of fetching again; waiters poll
  the lock and get the response once it is cached whole. ``proxy_cache_lock_age`` is
  raised to the same (its default of 5 s would let a second fetch start while a large
  blob is still arriving; rpardini leaves it at the default);
- blobs by digest cached 60 days under the digest alone (shared across repositories),
  manifests by digest cached 60 days under the URI, manifests by tag cached for the
  proxy's default tag TTL (5 min; rpardini's optional manifest cache, enabled), anything
  else (``/v2/``, blobs not by digest) passed through uncached;
- rpardini's cache settings: ``proxy_force_ranges``, ``proxy_ignore_client_abort``,
  ``proxy_cache_revalidate``, upstream ``Expires``/``Cache-Control``/``Set-Cookie``
  ignored, ``proxy_read_timeout 900``;
- ``proxy_buffering on`` (the default, stated), ``sendfile on``, HTTP/1.1 with keep-alive
  to the upstream (an ``upstream`` block with ``keepalive``, ``Connection: ""``);
- ``worker_processes auto`` as rpardini's (one per core), or a number given.

The cache key of a manifest is its URI, as rpardini's: the ``Accept`` header is not part
of it, so every client gets whatever type was cached first (wrong in general; the bench's
images have one manifest each).
"""

from __future__ import annotations

import grp
import os
import pwd
import urllib.error
import urllib.request
from pathlib import Path

from tests.rig.process import ChildProcess, LoopbackAddress, binary_version, free_port

NGINX_BINARY = "/usr/sbin/nginx"
TAG_TTL = "5m"
LOCK_TIMEOUT = "880s"

NGINX_CONF = """\
{user}worker_processes {workers};
pid {prefix}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 4096;
}}

http {{
    default_type application/octet-stream;
    access_log {prefix}/access.log combined;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    gzip off;

    client_body_temp_path {prefix}/temp/body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;

    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=registry:16m max_size=64g
                     inactive=60d use_temp_path=off;

    upstream registry {{
        server {upstream};
        keepalive 32;
    }}

    server {{
        listen 127.0.0.1:{port};
        chunked_transfer_encoding on;
        client_max_body_size 0;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout 900s;
        proxy_buffering on;

        proxy_cache_lock on;
        proxy_cache_lock_timeout {lock_timeout};
        proxy_cache_lock_age {lock_timeout};
        proxy_force_ranges on;
        proxy_ignore_client_abort on;
        proxy_cache_revalidate on;
        proxy_hide_header Set-Cookie;
        proxy_ignore_headers X-Accel-Expires Expires Cache-Control Set-Cookie;

        location ~ "^/v2/.+/blobs/(?<blob_digest>sha256:[0-9a-f]{{64}})$" {{
            proxy_pass http://registry;
            proxy_cache registry;
            proxy_cache_key $blob_digest;
            proxy_cache_valid 200 206 60d;
        }}

        location ~ "^/v2/.+/manifests/sha256:[0-9a-f]{{64}}$" {{
            proxy_pass http://registry;
            proxy_cache registry;
            proxy_cache_key $uri;
            proxy_cache_valid 200 60d;
        }}

        location ~ ^/v2/.+/manifests/ {{
            proxy_pass http://registry;
            proxy_cache registry;
            proxy_cache_key $uri;
            proxy_cache_valid 200 {tag_ttl};
        }}

        location / {{
            proxy_pass http://registry;
            proxy_cache off;
        }}
    }}
}}
"""


def nginx_version(binary: str = NGINX_BINARY) -> str:
    """``nginx/1.22.1`` (``nginx -v`` says ``nginx version: nginx/1.22.1`` on stderr)."""
    return binary_version([binary, "-v"]).removeprefix("nginx version: ")


class Nginx(ChildProcess, LoopbackAddress):
    """nginx caching in front of ``upstream`` (``HOST:PORT``), stopped by its master's PID."""

    name = "nginx"

    def __init__(
        self, workdir: Path, *, upstream: str, workers: str = "auto", binary: str = NGINX_BINARY
    ) -> None:
        super().__init__(workdir, log_name="nginx.log")
        self.binary = binary
        self.port = free_port()
        self.prefix = workdir
        self.conf_path = workdir / "nginx.conf"
        self.access_log_path = workdir / "access.log"
        for sub in ("cache", "temp"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(
            NGINX_CONF.format(
                user=self._user_line(),
                workers=workers,
                prefix=workdir,
                upstream=upstream,
                port=self.port,
                lock_timeout=LOCK_TIMEOUT,
                tag_ttl=TAG_TTL,
            )
        )

    @staticmethod
    def _user_line() -> str:
        """Run as root, nginx's workers would switch to ``nobody``, who cannot enter the
        scratch directory (mode 0700): keep them as the bench's own user."""
        if os.geteuid() != 0:
            return ""
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        return f"user {user} {group};\n"

    def available(self) -> bool:
        return os.access(self.binary, os.X_OK)

    def argv(self) -> list[str]:
        return [
            self.binary,
            "-p",
            str(self.prefix),
            "-c",
            str(self.conf_path),
            "-e",
            "stderr",
            "-g",
            "daemon off;",
        ]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v2/", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def cached_files(self) -> int:
        """Complete entries in the cache directory (temporary files have a dot suffix)."""
        return sum(
            1
            for path in (self.prefix / "cache").rglob("*")
            if path.is_file() and "." not in path.name
        )
