"""Settings: parsed once, validated, frozen.

This module is the only reader of the configuration file and of ``os.environ``.
Precedence, lowest first: built-in defaults, the YAML file, ``REGISTRY_PROXY_<KEY>``
environment variables, command-line flags. Every error names the key (or the
environment variable) that is wrong, so an operator can fix it without reading code.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_LISTEN = "0.0.0.0:5000"
DEFAULT_UPSTREAM_URL = "https://registry-1.docker.io"
DEFAULT_UPSTREAM_NAME = "dockerhub"
DEFAULT_DOCKERHUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")
DEFAULT_CACHE_DIR = "./registry-proxy-cache"
DEFAULT_TAG_TTL = 300.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_MEMORY_ENTRIES = 100_000
DEFAULT_MAX_STALE = 7 * 86400.0
DEFAULT_RATELIMIT_FLOOR = 10
DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_COOLDOWN = 30.0
DEFAULT_RETRIES = 2
DEFAULT_LOG_LEVEL = "info"
ENV_PREFIX = "REGISTRY_PROXY_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
DEFAULT_LOG_FORMAT = "text"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_UPSTREAM_NAME = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*\Z")


class ConfigError(ValueError):
    """A configuration value is wrong; ``key`` names it (dotted path or env variable)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def parse_duration(value: object, key: str) -> float:
    """Seconds from ``300``, ``90s``, ``5m``, ``2h``, ``7d`` or ``500ms``."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration such as 300, 90s, 5m or 7d, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(key, f"expected a duration such as 300, 90s, 5m or 7d, got {value!r}")
    if not math.isfinite(seconds):
        raise ConfigError(key, "must be a finite number of seconds")
    if seconds < 0:
        raise ConfigError(key, "must not be negative")
    return seconds


def parse_size(value: object, key: str) -> int:
    """Bytes from ``1048576``, ``500MiB``, ``20GiB``, ``1TB``."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size such as 500MiB or 20GiB, got {value!r}")
    if isinstance(value, int) and value > 0:
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ConfigError(key, f"expected a size such as 500MiB or 20GiB, got {value!r}")
    unit = m.group(2).lower() if m.group(2) else None
    size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ConfigError(key, "must be positive")
    return size


def parse_listen(value: object, key: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` into (host, port)."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(key, f"port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port out of range: {port}")
    return host or "0.0.0.0", port


@dataclass(frozen=True)
class UpstreamSettings:
    """One upstream registry."""

    name: str
    url: str
    aliases: tuple[str, ...] = ()
    default: bool = False
    tag_ttl: float = DEFAULT_TAG_TTL
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_env: str | None = None
    password_file: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_stale: float = DEFAULT_MAX_STALE
    stale_on_404: bool = False
    ratelimit_floor: int = DEFAULT_RATELIMIT_FLOOR
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    cooldown: float = DEFAULT_COOLDOWN
    retries: int = DEFAULT_RETRIES

    @property
    def host(self) -> str:
        """The URL's ``host[:port]``: what containerd sends as ``ns``."""
        return urlsplit(self.url).netloc.lower()

    def namespaces(self) -> frozenset[str]:
        """Registry host names routed here: the URL's host[:port] and the aliases."""
        return frozenset({self.host, *(a.lower() for a in self.aliases)})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "url": self.url,
            "aliases": list(self.aliases),
            "default": self.default,
            "tag_ttl": self.tag_ttl,
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "max_stale": self.max_stale,
            "stale_on_404": self.stale_on_404,
            "ratelimit_floor": self.ratelimit_floor,
            "failure_threshold": self.failure_threshold,
            "cooldown": self.cooldown,
            "retries": self.retries,
        }
        if self.username is not None:
            out["username"] = self.username
        if self.password_env is not None:
            out["password_env"] = self.password_env
        if self.password_file is not None:
            out["password_file"] = self.password_file
        if self.password is not None:
            out["password"] = "<redacted>"
        return out


@dataclass(frozen=True)
class Settings:
    listen_host: str = "0.0.0.0"
    listen_port: int = 5000
    cache_dir: Path = Path(DEFAULT_CACHE_DIR)
    redis_url: str | None = field(default=None, repr=False)
    memory_entries: int = DEFAULT_MEMORY_ENTRIES
    max_size: int | None = None
    log_level: str = DEFAULT_LOG_LEVEL
    log_format: str = DEFAULT_LOG_FORMAT
    metrics_listen: tuple[str, int] | None = None
    upstreams: tuple[UpstreamSettings, ...] = ()

    @property
    def default_upstream(self) -> UpstreamSettings | None:
        for up in self.upstreams:
            if up.default:
                return up
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "listen": _join_listen(self.listen_host, self.listen_port),
            "log_level": self.log_level,
            "log_format": self.log_format,
            "metrics_listen": _join_listen(*self.metrics_listen) if self.metrics_listen else None,
            "cache": {
                "dir": str(self.cache_dir),
                "redis": _redact_url(self.redis_url),
                "memory_entries": self.memory_entries,
                "max_size": self.max_size,
            },
            "upstreams": [u.to_dict() for u in self.upstreams],
        }

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        *,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Build settings from a parsed YAML mapping, the environment and CLI overrides.

        ``overrides`` keys: listen, metrics_listen, upstream, cache_dir, redis, tag_ttl,
        log_level, log_format.
        ``environ`` supplies both the ``REGISTRY_PROXY_*`` overrides and ``password_env``
        look-ups (``os.environ`` when None).
        """
        env = os.environ if environ is None else environ
        _check_keys(
            data, {"listen", "metrics_listen", "cache", "upstreams", "log_level", "log_format"}, ""
        )
        flat: dict[str, Any] = {}
        cache = data.get("cache") or {}
        if not isinstance(cache, Mapping):
            raise ConfigError("cache", "expected a mapping")
        _check_keys(cache, {"dir", "redis", "memory_entries", "max_size"}, "cache.")
        for key, value in (
            ("listen", data.get("listen")),
            ("log_level", data.get("log_level")),
            ("log_format", data.get("log_format")),
            ("metrics_listen", data.get("metrics_listen")),
            ("cache_dir", cache.get("dir")),
            ("redis", cache.get("redis")),
            ("memory_entries", cache.get("memory_entries")),
            ("max_size", cache.get("max_size")),
        ):
            if value is not None:
                flat[key] = (value, _FILE_KEYS[key])
        for key in _OVERRIDABLE:
            env_name = ENV_PREFIX + key.upper()
            if env.get(env_name):
                flat[key] = (env[env_name], env_name)
        for key, value in (overrides or {}).items():
            if value is not None:
                flat[key] = (value, "--" + key.replace("_", "-"))

        listen = flat.get("listen", (DEFAULT_LISTEN, "listen"))
        host, port = parse_listen(*listen)
        level_value, level_key = flat.get("log_level", (DEFAULT_LOG_LEVEL, "log_level"))
        level = str(level_value).lower()
        if level not in LOG_LEVELS:
            raise ConfigError(level_key, f"expected one of {', '.join(LOG_LEVELS)}")
        fmt_value, fmt_key = flat.get("log_format", (DEFAULT_LOG_FORMAT, "log_format"))
        log_format = str(fmt_value).lower()
        if log_format not in LOG_FORMATS:
            raise ConfigError(fmt_key, f"expected one of {', '.join(LOG_FORMATS)}")
        metrics_listen = parse_listen(*flat["metrics_listen"]) if "metrics_listen" in flat else None
        cache_dir_value, cache_dir_key = flat.get("cache_dir", (DEFAULT_CACHE_DIR, "cache.dir"))
        if not isinstance(cache_dir_value, str | Path) or not str(cache_dir_value):
            raise ConfigError(cache_dir_key, "expected a directory path")
        redis_url: str | None = None
        if "redis" in flat:
            redis_value, redis_key = flat["redis"]
            redis_url = _check_redis_url(redis_value, redis_key)
        entries_value, entries_key = flat.get(
            "memory_entries", (DEFAULT_MEMORY_ENTRIES, "cache.memory_entries")
        )
        if (
            isinstance(entries_value, bool)
            or not isinstance(entries_value, int)
            or (entries_value < 1)
        ):
            raise ConfigError(entries_key, "expected a positive integer")

        upstreams = _parse_upstreams(data.get("upstreams"), env)
        if "upstream" in flat:
            url_value, url_key = flat["upstream"]
            upstreams = _override_default_url(
                upstreams, url_value, url_key, builtin=data.get("upstreams") is None
            )
        if "tag_ttl" in flat:
            ttl = parse_duration(*flat["tag_ttl"])
            upstreams = tuple(replace(u, tag_ttl=ttl) for u in upstreams)
        return cls(
            listen_host=host,
            listen_port=port,
            cache_dir=Path(cache_dir_value),
            redis_url=redis_url,
            memory_entries=entries_value,
            max_size=parse_size(*flat["max_size"]) if "max_size" in flat else None,
            log_level=level,
            log_format=log_format,
            metrics_listen=metrics_listen,
            upstreams=upstreams,
        )


_OVERRIDABLE = (
    "listen",
    "max_size",
    "metrics_listen",
    "upstream",
    "cache_dir",
    "redis",
    "tag_ttl",
    "log_level",
    "log_format",
)

_FILE_KEYS = {
    "listen": "listen",
    "metrics_listen": "metrics_listen",
    "log_level": "log_level",
    "log_format": "log_format",
    "cache_dir": "cache.dir",
    "redis": "cache.redis",
    "memory_entries": "cache.memory_entries",
    "max_size": "cache.max_size",
}

_UPSTREAM_KEYS = {
    "name",
    "url",
    "aliases",
    "default",
    "tag_ttl",
    "username",
    "password",
    "password_env",
    "password_file",
    "connect_timeout",
    "read_timeout",
    "max_stale",
    "stale_on_404",
    "ratelimit_floor",
    "failure_threshold",
    "cooldown",
    "retries",
}


def load_settings(
    path: str | Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the YAML file at ``path`` (optional) and build validated settings."""
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("--config", f"not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise ConfigError("--config", "the top level must be a mapping")
    return Settings.from_mapping(data, environ=environ, overrides=overrides)


def _join_listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_keys(data: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}", "unknown key")


def _check_url(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, "expected an http(s) URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(key, f"expected an http(s) URL, got {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(key, "the URL must have no path, query or fragment")
    if parts.username or parts.password:
        raise ConfigError(key, "put credentials in username/password_env, not the URL")
    return f"{parts.scheme}://{parts.netloc}"


def _check_redis_url(value: object, key: str) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(key, "expected a redis://, rediss:// or unix:// URL")
    return value


def _redact_url(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":<redacted>@")
    return parts._replace(netloc=netloc).geturl()


def _parse_upstreams(raw: object, env: Mapping[str, str]) -> tuple[UpstreamSettings, ...]:
    if raw is None:
        return (
            UpstreamSettings(
                name=DEFAULT_UPSTREAM_NAME,
                url=DEFAULT_UPSTREAM_URL,
                aliases=DEFAULT_DOCKERHUB_ALIASES,
                default=True,
            ),
        )
    if not isinstance(raw, list) or not raw:
        raise ConfigError("upstreams", "expected a non-empty list")
    result: list[UpstreamSettings] = []
    for index, item in enumerate(raw):
        result.append(_parse_upstream(item, f"upstreams[{index}]", env))
    names = [u.name for u in result]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(f"upstreams[{index}].name", f"duplicate name {name!r}")
    seen: dict[str, str] = {}
    for index, up in enumerate(result):
        for ns in up.namespaces():
            if ns in seen:
                raise ConfigError(
                    f"upstreams[{index}].aliases", f"{ns!r} already routes to {seen[ns]!r}"
                )
            seen[ns] = up.name
    defaults = [u for u in result if u.default]
    if len(defaults) > 1:
        raise ConfigError("upstreams", "at most one upstream may be the default")
    if not defaults and len(result) == 1:
        result[0] = replace(result[0], default=True)
    return tuple(result)


def _parse_upstream(item: object, key: str, env: Mapping[str, str]) -> UpstreamSettings:
    if not isinstance(item, Mapping):
        raise ConfigError(key, "expected a mapping")
    _check_keys(item, _UPSTREAM_KEYS, key + ".")
    name = item.get("name")
    if not isinstance(name, str) or not _UPSTREAM_NAME.match(name):
        raise ConfigError(f"{key}.name", "expected a lower-case name such as 'dockerhub'")
    url = _check_url(item.get("url"), f"{key}.url")
    aliases = item.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError(f"{key}.aliases", "expected a list of host names")
    default = _bool(item, "default", False, key)
    username = item.get("username")
    if username is not None and not isinstance(username, str):
        raise ConfigError(f"{key}.username", "expected a string")
    password = _read_password(item, key, env)
    if password is not None and username is None:
        raise ConfigError(f"{key}.username", "a password is configured but no username")
    return UpstreamSettings(
        name=name,
        url=url,
        aliases=tuple(aliases),
        default=default,
        tag_ttl=parse_duration(item.get("tag_ttl", DEFAULT_TAG_TTL), f"{key}.tag_ttl"),
        username=username,
        password=password,
        password_env=item.get("password_env"),
        password_file=item.get("password_file"),
        connect_timeout=parse_duration(
            item.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT), f"{key}.connect_timeout"
        ),
        read_timeout=parse_duration(
            item.get("read_timeout", DEFAULT_READ_TIMEOUT), f"{key}.read_timeout"
        ),
        max_stale=parse_duration(item.get("max_stale", DEFAULT_MAX_STALE), f"{key}.max_stale"),
        stale_on_404=_bool(item, "stale_on_404", False, key),
        ratelimit_floor=_int(item, "ratelimit_floor", DEFAULT_RATELIMIT_FLOOR, key, minimum=0),
        failure_threshold=_int(
            item, "failure_threshold", DEFAULT_FAILURE_THRESHOLD, key, minimum=1
        ),
        cooldown=parse_duration(item.get("cooldown", DEFAULT_COOLDOWN), f"{key}.cooldown"),
        retries=_int(item, "retries", DEFAULT_RETRIES, key, minimum=0),
    )


def _bool(item: Mapping[str, Any], name: str, default: bool, key: str) -> bool:
    value = item.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}.{name}", "expected true or false")
    return value


def _int(item: Mapping[str, Any], name: str, default: int, key: str, *, minimum: int) -> int:
    value = item.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}.{name}", f"expected an integer >= {minimum}")
    return value


def _read_password(item: Mapping[str, Any], key: str, env: Mapping[str, str]) -> str | None:
    sources = [k for k in ("password", "password_env", "password_file") if item.get(k)]
    if len(sources) > 1:
        raise ConfigError(f"{key}.{sources[1]}", f"set only one of {', '.join(sources)}")
    if not sources:
        return None
    source = sources[0]
    value = item[source]
    if not isinstance(value, str):
        raise ConfigError(f"{key}.{source}", "expected a string")
    if source == "password":
        return value
    if source == "password_env":
        if value not in env:
            raise ConfigError(f"{key}.password_env", f"environment variable {value} is not set")
        return env[value]
    try:
        return Path(value).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{key}.password_file", f"cannot read {value}: {exc.strerror}") from None


def _override_default_url(
    upstreams: tuple[UpstreamSettings, ...], url_value: object, url_key: str, *, builtin: bool
) -> tuple[UpstreamSettings, ...]:
    """Point the default upstream at ``url``.

    When the upstream is the built-in Docker Hub default and the URL is another registry,
    Docker Hub's aliases and name no longer describe it: it becomes ``upstream`` with none,
    so ``?ns=docker.io`` is refused instead of being served from another registry.
    """
    url = _check_url(url_value, url_key)
    result = []
    for up in upstreams:
        if up.default:
            if builtin and url != DEFAULT_UPSTREAM_URL:
                up = replace(up, name="upstream", url=url, aliases=())
            else:
                up = replace(up, url=url)
        result.append(up)
    return tuple(result)
