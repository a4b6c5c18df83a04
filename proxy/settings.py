"""Settings: declared once, parsed once, validated, frozen.

The scheme. ``Settings`` and ``UpstreamSettings`` are msgspec Structs and they *are* the
schema. A field's type carries its constraints (``msgspec.Meta``) and, as ``Annotated``
markers, what the sources need to know:

* ``Parse(fn)`` on a type: how a written value becomes the field's value (durations,
  sizes, ``HOST:PORT``, URLs). One function per form, the same for every source.
* ``Expect(text)`` on a type: what an operator is told when a value is refused.
* ``Secret(render)`` on a field: how it appears in ``repr`` and ``to_dict``.
* ``Key(...)`` on a field: its YAML path (``cache.dir``), the option that overrides it
  and the option's help text.

From that one declaration come the YAML keys accepted (any other is an "unknown key"),
``to_dict`` (what ``check-config`` prints), and ``OPTIONS``: each option is both the
environment variable ``REGISTRY_PROXY_<NAME>`` and the flag ``--<name>`` that
``proxy.__main__`` adds to argparse. Every top-level and ``cache`` scalar has one; so do
``tag_ttl`` (every upstream) and ``upstream`` (the default upstream's ``url``).

Precedence, lowest first: the fields' defaults (named constants), the YAML file, the
environment, the flags. Each value is converted on its own (``msgspec.convert`` to its
field's type), so an error always names its key: the dotted path or ``upstreams[i].x``,
the environment variable, or the flag. YAML values are converted strictly (``"10"`` is not
a number); environment and flag values are text and converted leniently. ``null`` in the
file means "not set". Rules across fields (password sources, duplicate names and
aliases, the single default) run after conversion.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import UnionType
from typing import (
    Annotated,
    Any,
    Final,
    Literal,
    TypeAlias,
    TypeVar,
    Union,
    get_args,
    get_origin,
)
from urllib.parse import unquote, urlsplit

import msgspec
import yaml
from msgspec import Meta
from msgspec.structs import FieldInfo, fields, replace

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
DEFAULT_HEADER_TIMEOUT = 30.0
DEFAULT_KEEPALIVE_TIMEOUT = 75.0
DEFAULT_SEND_TIMEOUT = 60.0
MIN_FREE_BYTES_CAP = 1 << 30
MIN_FREE_FRACTION_CAP = 0.05
"""Without ``cache.min_free``: keep the smaller of 1 GiB and 5 % of the filesystem free."""
DEFAULT_LOG_LEVEL: Final = "info"
DEFAULT_LOG_FORMAT: Final = "text"
DEFAULT_TOKEN_EXPIRY = 300.0
DEFAULT_TOKEN_SERVICE = "registry-proxy"
DEFAULT_DECISION_TTL = 300.0
DEFAULT_VISIBILITY_TTL = 3600.0
DEFAULT_HIGH_WATERMARK = 0.9
DEFAULT_LOW_WATERMARK = 0.8
DEFAULT_MIN_AGE = 300.0
DEFAULT_GC_GRACE = 3600.0
DEFAULT_PROBE_RATE = 120  # per minute
DEFAULT_LEASE_TTL = 10.0
DEFAULT_SHUTDOWN_GRACE = 25.0
DEFAULT_WORKERS = 1
MAX_WORKERS = 256
ENV_PREFIX = "REGISTRY_PROXY_"
# The upstream the --upstream option turns the built-in Docker Hub default into.
OVERRIDDEN_UPSTREAM_NAME = "upstream"

_S = TypeVar("_S", bound=msgspec.Struct)

LogLevelName = Literal["debug", "info", "warning", "error", "critical"]
LogFormatName = Literal["text", "json"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevelName)
LOG_FORMATS: tuple[str, ...] = get_args(LogFormatName)

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


# --- the forms a value may be written in --------------------------------------------


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


def parse_workers(value: object, key: str) -> int:
    """A number of worker processes from ``4`` or ``auto`` (one per core)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, min(os.cpu_count() or 1, MAX_WORKERS))
    number: object = value
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_WORKERS:
        raise ConfigError(
            key, f"expected a number of workers from 1 to {MAX_WORKERS} or auto, got {value!r}"
        )
    return number


def parse_fraction(value: object, key: str) -> float:
    """A share of a whole from ``0.9`` or ``90%``; above 0, at most 1."""
    text: object = value
    if isinstance(value, str):
        number, percent = value.strip().removesuffix("%"), value.strip().endswith("%")
        try:
            text = float(number) / (100 if percent else 1)
        except ValueError:
            text = None
    if isinstance(text, bool) or not isinstance(text, int | float) or not 0 < text <= 1:
        raise ConfigError(key, f"expected a share such as 90% or 0.9, got {value!r}")
    return float(text)


def parse_free_space(value: object, key: str) -> int | float:
    """Bytes (``2GiB``, ``0`` to disable) or a share of the filesystem (``5%``, a float)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            percent = float(value.strip()[:-1])
        except ValueError:
            raise ConfigError(
                key, f"expected a size such as 2GiB or a share such as 5%, got {value!r}"
            ) from None
        if not 0 <= percent < 100 or not math.isfinite(percent):
            raise ConfigError(key, "a share must be at least 0% and under 100%")
        return percent / 100
    if value == 0 or value == "0":
        return 0
    return parse_size(value, key)


def _show_free_space(value: int | float | None) -> object:
    if isinstance(value, float):
        return f"{value * 100:g}%"
    return value


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


def parse_directory(value: object, key: str) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ConfigError(key, "expected a directory path")
    return Path(value)


def parse_upstream_url(value: object, key: str) -> str:
    """An http(s) origin without credentials, normalised to ``scheme://host[:port]``."""
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


SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_REDIS_PORT = 6379


def _host_list(hosts: str, default_port: int, what: str) -> tuple[tuple[str, int], ...]:
    """``host[:port][,host[:port]...]`` (``[v6]:port`` too); ValueError naming ``what``."""
    found: list[tuple[str, int]] = []
    for item in (i.strip() for i in hosts.split(",")):
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":") if rest else str(default_port)
            bad = not rest.startswith(":") and rest != ""
        else:
            host, colon, port = item.rpartition(":")
            if not colon:
                host, port = item, str(default_port)
            bad = ":" in host  # an IPv6 address goes in brackets
        if bad or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad {what} address {item!r}")
        found.append((host, int(port)))
    return tuple(found)


@dataclass(frozen=True)
class SentinelUrl:
    """``redis+sentinel://[:password@]host[:port][,host[:port]...]/<service>[/<db>]``."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    password: str | None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        """Raises ValueError naming what is wrong."""
        parts = urlsplit(url)
        if parts.scheme != SENTINEL_SCHEME:
            raise ValueError(f"expected a {SENTINEL_SCHEME}:// URL")
        credentials, _, hosts = parts.netloc.rpartition("@")
        password = unquote(credentials.partition(":")[2]) if credentials else None
        sentinels = _host_list(hosts, DEFAULT_SENTINEL_PORT, "sentinel")
        path = [p for p in parts.path.split("/") if p]
        if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError("expected /<service name>[/<db>] after the sentinels")
        return cls(sentinels, path[0], int(path[1]) if len(path) == 2 else 0, password)


@dataclass(frozen=True)
class ClusterUrl:
    """``redis+cluster://[[user]:password@]host[:port][,host[:port]...][/]``: the startup
    nodes of a Redis Cluster (any few of its nodes; the client learns the rest from
    them); ``rediss+cluster://`` for TLS. A cluster has one database, 0."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> ClusterUrl:
        """Raises ValueError naming what is wrong."""
        parts = urlsplit(url)
        if parts.scheme not in CLUSTER_SCHEMES:
            raise ValueError("expected a redis+cluster:// or rediss+cluster:// URL")
        credentials, at, hosts = parts.netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = credentials.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else None
        nodes = _host_list(hosts, DEFAULT_REDIS_PORT, "cluster node")
        if parts.path not in ("", "/", "/0") or parts.query or parts.fragment:
            raise ValueError("a cluster URL has no /<db> but /0, no query, no fragment")
        return cls(nodes, username, password, parts.scheme == "rediss+cluster")


def parse_redis_url(value: object, key: str) -> str:
    schemes = ("redis", "rediss", "unix", SENTINEL_SCHEME, *CLUSTER_SCHEMES)
    if not isinstance(value, str) or urlsplit(value).scheme not in schemes:
        raise ConfigError(
            key,
            "expected a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL",
        )
    # The formats redis-py does not parse itself: checked here, at start-up.
    scheme = urlsplit(value).scheme
    try:
        if scheme == SENTINEL_SCHEME:
            SentinelUrl.parse(value)
        elif scheme in CLUSTER_SCHEMES:
            ClusterUrl.parse(value)
    except ValueError as exc:
        example = (
            "redis+sentinel://host:port,.../service/db"
            if scheme == SENTINEL_SCHEME
            else "redis+cluster://host:port,host:port,.../"
        )
        raise ConfigError(key, f"{exc} ({example})") from None
    return value


_RATE = re.compile(r"^\s*([^/\s]+)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h|d)\s*$")


@dataclass(frozen=True)
class Rate:
    """``amount`` per ``period`` seconds: ``50/s``, ``200/6h``, ``10GiB/6h``."""

    amount: int
    period: float

    def __str__(self) -> str:
        # Plain decimal digits, as _RATE reads them (':g' wrote 30d as 2.592e+06s).
        period = format(Decimal(repr(self.period)), "f")
        if "." in period:
            period = period.rstrip("0").rstrip(".")
        return f"{self.amount}/{period}s"


def _rate(value: object, key: str, amount: Callable[[object, str], int]) -> Rate:
    m = _RATE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ConfigError(key, f"expected a rate such as 50/s or 200/6h, got {value!r}")
    count = amount(m.group(1), key)
    period = float(m.group(2) or 1) * _DURATION_UNITS[m.group(3)]
    if count <= 0 or period <= 0:
        raise ConfigError(key, "a rate must be positive")
    return Rate(count, period)


def parse_count_rate(value: object, key: str) -> Rate:
    """``50/s``, ``200/6h``: a number of events per period."""

    def count(text: object, key: str) -> int:
        if not isinstance(text, str) or not text.isdigit():
            raise ConfigError(key, f"expected a rate such as 50/s or 200/6h, got {value!r}")
        return int(text)

    return _rate(value, key, count)


def parse_size_rate(value: object, key: str) -> Rate:
    """``10GiB/6h``: bytes per period."""
    return _rate(value, key, parse_size)


def parse_network(value: object, key: str) -> str:
    """An address or CIDR network (``10.0.0.0/8``, ``::1``), normalised."""
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise ConfigError(key, f"expected an IP address or network, got {value!r}") from None


def parse_networks(value: object, key: str) -> tuple[str, ...]:
    """A list of addresses or networks, each normalised; an error names ``key[i]``."""
    if not isinstance(value, list | tuple):
        raise ConfigError(key, "expected a list of IP addresses or networks")
    return tuple(parse_network(item, f"{key}[{index}]") for index, item in enumerate(value))


def _lower(value: object, key: str) -> object:
    """Names of levels and formats are case-insensitive (``ERROR`` from the environment)."""
    return value.lower() if isinstance(value, str) else value


# --- the markers the schema is annotated with -----------------------------------------


@dataclass(frozen=True)
class Parse:
    """On a type: turns a written value into one msgspec can check; raises ConfigError."""

    fn: Callable[[object, str], object]


@dataclass(frozen=True)
class Expect:
    """On a type: the message when msgspec refuses a value, after ``expected``."""

    text: str


@dataclass(frozen=True)
class Show:
    """On a type or field: ``render`` gives the value as the file writes it (``to_dict``)."""

    render: Callable[[Any], object]


@dataclass(frozen=True)
class Secret(Show):
    """On a field: ``render`` shows it without the secret, in ``repr`` too."""


@dataclass(frozen=True)
class Key:
    """On a field: where its value may come from besides its default.

    ``path`` is the dotted YAML path (the field name when empty). ``option`` names the
    environment variable and flag that override it (the field name when empty); with
    ``overridable=False`` there are none. A field without a Key has a YAML key (its name)
    and no option. On an upstream field the option applies to ``every`` upstream or only
    to the ``default`` one.
    """

    path: str = ""
    option: str = ""
    overridable: bool = True
    help: str = ""
    metavar: str = "VALUE"
    applies_to: Literal["every", "default"] = "every"


def _join_listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _show_address(address: tuple[str, int] | None) -> str | None:
    return None if address is None else _join_listen(*address)


def _redact_url(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":<redacted>@")
    return parts._replace(netloc=netloc).geturl()


def _redact(secret: str | None) -> str | None:
    return None if secret is None else "<redacted>"


def _show_upstreams(upstreams: tuple[UpstreamSettings, ...]) -> list[dict[str, Any]]:
    return [up.to_dict() for up in upstreams]


Duration = Annotated[float, Parse(parse_duration)]
Workers = Annotated[int, Parse(parse_workers)]
Size = Annotated[int, Parse(parse_size)]
Fraction = Annotated[float, Parse(parse_fraction)]
FreeSpace = Annotated[int | float, Parse(parse_free_space), Show(_show_free_space)]
Address = Annotated[tuple[str, int], Parse(parse_listen), Show(_show_address)]
Directory = Annotated[Path, Parse(parse_directory), Show(str)]
UpstreamUrl = Annotated[str, Parse(parse_upstream_url)]
RedisUrl = Annotated[str, Parse(parse_redis_url)]
Flag = Annotated[bool, Expect("true or false")]
PositiveInt = Annotated[int, Meta(ge=1), Expect("a positive integer")]
NonNegativeInt = Annotated[int, Meta(ge=0), Expect("an integer >= 0")]
Text = Annotated[str, Expect("a string")]
UpstreamName = Annotated[
    str, Meta(pattern=_UPSTREAM_NAME.pattern), Expect("a lower-case name such as 'dockerhub'")
]
CountRate = Annotated[Rate, Parse(parse_count_rate), Show(str)]
SizeRate = Annotated[Rate, Parse(parse_size_rate), Show(str)]
# A Parse marker applies to the field's own type, not to the items of a tuple.
Networks = Annotated[tuple[str, ...], Parse(parse_networks), Show(list)]
FilePath = Annotated[Path, Parse(parse_directory), Show(str), Expect("a file path")]
Visibility = Literal["auto", "public", "private"]
HostNames = Annotated[
    tuple[Annotated[str, Meta(min_length=1)], ...], Expect("a list of host names"), Show(list)
]
LogLevel = Annotated[LogLevelName, Parse(_lower), Expect(f"one of {', '.join(LOG_LEVELS)}")]
LogFormat = Annotated[LogFormatName, Parse(_lower), Expect(f"one of {', '.join(LOG_FORMATS)}")]


# --- the schema ------------------------------------------------------------------------


def _section(cls: type[_S]) -> Parse:
    """Parse a mapping into the Struct ``cls`` key by key, so an error names its key."""

    def parse(value: object, key: str) -> object:
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(key, "expected a mapping")
        allowed = {info.name for info in fields(cls)}
        for name in value:
            if name not in allowed:
                raise ConfigError(f"{key}.{name}", "unknown key")
        values: dict[str, Any] = {}
        for info in fields(cls):
            item = value.get(info.name)
            if item is not None or info.required:  # a missing required key is refused by name
                values[info.name] = _convert(info, item, f"{key}.{info.name}", True)
        return cls(**values)

    return Parse(parse)


def _items(cls: type[_S]) -> Parse:
    """Parse a list of mappings into a tuple of ``cls``, naming ``key[i].field``."""
    item = _section(cls)

    def parse(value: object, key: str) -> object:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, "expected a list")
        return tuple(item.fn(entry, f"{key}[{index}]") for index, entry in enumerate(value))

    return Parse(parse)


def _show_struct(value: Any) -> Any:
    if isinstance(value, msgspec.Struct):
        return {k: _show_struct(v) for k, v in _shown(value).items() if v is not None}
    if isinstance(value, tuple):
        return [_show_struct(v) for v in value]
    if isinstance(value, dict):
        return {k: _show_struct(v) for k, v in value.items()}
    return value


_SectionShow = Show(_show_struct)


class TokenSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``auth.token``: the proxy's own token service (Distribution's token auth)."""

    key: FilePath | None = None
    """PEM private key (EC P-256 or RSA); absent: generated into the cache directory."""
    expiry: Duration = DEFAULT_TOKEN_EXPIRY
    service: Text = DEFAULT_TOKEN_SERVICE
    realm: Text | None = None
    """The token URL clients are sent to; absent: ``<scheme>://<Host>/token`` of the request."""


class AuthSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``auth``: who a client is (local users, tokens, credential pass-through)."""

    htpasswd: FilePath | None = None
    token: Annotated[TokenSettings, _section(TokenSettings), _SectionShow] = TokenSettings()
    trusted_proxies: Networks = ()
    decision_ttl: Duration = DEFAULT_DECISION_TTL
    visibility_ttl: Duration = DEFAULT_VISIBILITY_TTL
    probe_rate: CountRate = Rate(DEFAULT_PROBE_RATE, 60.0)
    """Upstream access checks (visibility, pass-through, logins) one client address may
    cause; remembered answers cost none."""


class AccessRule(msgspec.Struct, frozen=True, kw_only=True):
    """One item of ``access.rules``: a pattern over ``<upstream>/<repository>`` and who
    may pull there."""

    repos: Annotated[str, Meta(min_length=1), Expect("a pattern such as 'dockerhub/**'")]
    pull: Annotated[tuple[Text, ...], Expect("a list of names"), Show(list)] = ()


DEFAULT_RULES: Final = (AccessRule(repos="**", pull=("anonymous", "passthrough")),)


class AccessSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``access``: who may pull what. Longest matching pattern wins; no match denies."""

    groups: Annotated[
        dict[str, tuple[str, ...]], Expect("a mapping of group names to user lists")
    ] = msgspec.field(default_factory=dict)
    admins: Annotated[tuple[Text, ...], Show(list)] = ()
    rules: Annotated[tuple[AccessRule, ...], _items(AccessRule), _SectionShow] = DEFAULT_RULES


class LimitSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``limits``: per-identity request rate and cold-fetch quotas."""

    requests: CountRate | None = None
    cold_fetches: CountRate | None = None
    cold_bytes: SizeRate | None = None


def parse_advertise(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, "expected HOST:PORT or http://HOST:PORT")
    text = value.strip()
    url = text if "://" in text else f"http://{text}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ConfigError(key, "expected HOST:PORT or http://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(key, "the address must have no path, query or credentials")
    return f"{parts.scheme}://{parts.netloc}"


Advertise = Annotated[str, Parse(parse_advertise), Expect("HOST:PORT")]


@dataclass(frozen=True)
class ClusterSettings:
    """The ``cluster`` keys (``Settings.cluster``): replicas sharing ``cache.redis``
    behave as one cache (fetch leases, peer streaming and fill). Off unless
    ``advertise`` and ``secret_file`` are both set."""

    advertise: str | None = None
    """Where the other replicas reach this one (its listener), e.g. the pod IP and port."""
    secret_file: Path | None = None
    """A file holding the secret shared by the replicas (peer requests are HMAC-signed)."""
    lease_ttl: float = DEFAULT_LEASE_TTL
    """How long a fetch lease lives without renewal (renewed every third of it)."""

    @property
    def enabled(self) -> bool:
        return self.advertise is not None and self.secret_file is not None


class UpstreamSettings(msgspec.Struct, frozen=True, kw_only=True):
    """One upstream registry: an item of ``upstreams`` in the file, keys as the fields.

    Fields are in the order ``to_dict`` prints them.
    """

    name: UpstreamName
    url: Annotated[
        UpstreamUrl,
        Key(
            option="upstream",
            applies_to="default",
            help="URL of the default upstream",
            metavar="URL",
        ),
    ]
    aliases: HostNames = ()
    default: Flag = False
    tag_ttl: Annotated[Duration, Key(help="tag TTL for every upstream", metavar="DURATION")] = (
        DEFAULT_TAG_TTL
    )
    connect_timeout: Duration = DEFAULT_CONNECT_TIMEOUT
    read_timeout: Duration = DEFAULT_READ_TIMEOUT
    max_stale: Duration = DEFAULT_MAX_STALE
    stale_on_404: Flag = False
    ratelimit_floor: NonNegativeInt = DEFAULT_RATELIMIT_FLOOR
    failure_threshold: PositiveInt = DEFAULT_FAILURE_THRESHOLD
    cooldown: Duration = DEFAULT_COOLDOWN
    retries: NonNegativeInt = DEFAULT_RETRIES
    visibility: Annotated[Visibility, Expect("auto, public or private")] | None = None
    passthrough: Flag | None = None
    username: Text | None = None
    password_env: Text | None = None
    password_file: Text | None = None
    # In the file: an inline password. Once loaded: the password, wherever it came from.
    password: Annotated[Text | None, Secret(_redact)] = None

    @property
    def has_credentials(self) -> bool:
        return self.username is not None

    @property
    def effective_visibility(self) -> Visibility:
        """``auto`` for an upstream the proxy has credentials for, else ``public``: what
        an anonymous upstream serves, it serves to anyone."""
        if self.visibility is not None:
            return self.visibility
        return "auto" if self.has_credentials else "public"

    @property
    def passthrough_enabled(self) -> bool:
        return self.has_credentials if self.passthrough is None else self.passthrough

    @property
    def host(self) -> str:
        """The URL's ``host[:port]``: what containerd sends as ``ns``."""
        return urlsplit(self.url).netloc.lower()

    def namespaces(self) -> frozenset[str]:
        """Registry host names routed here: the URL's host[:port] and the aliases."""
        return frozenset({self.host, *(a.lower() for a in self.aliases)})

    def to_dict(self) -> dict[str, Any]:
        """The file's form of this upstream; unset optional keys are left out."""
        return {k: v for k, v in _shown(self).items() if v is not None}

    def __repr__(self) -> str:
        return _repr(self)


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the proxy is configured with. Fields are in the order ``to_dict`` prints them."""

    listen: Annotated[Address, Key(help="address to listen on", metavar="HOST:PORT")] = (
        parse_listen(DEFAULT_LISTEN, "listen")
    )
    log_level: Annotated[LogLevel, Key(help="debug, info, warning, error", metavar="LEVEL")] = (
        DEFAULT_LOG_LEVEL
    )
    log_format: Annotated[LogFormat, Key(help="text (default) or json", metavar="FORMAT")] = (
        DEFAULT_LOG_FORMAT
    )
    metrics_listen: Annotated[
        Address | None, Key(help="also serve /metrics on this address", metavar="HOST:PORT")
    ] = None
    workers: Annotated[
        Workers,
        Key(
            help="processes serving the port and the cache together (auto: one per core)",
            metavar="N",
        ),
    ] = DEFAULT_WORKERS
    cache_dir: Annotated[
        Directory, Key(path="cache.dir", help="local cache directory", metavar="DIR")
    ] = Path(DEFAULT_CACHE_DIR)
    redis_url: Annotated[
        RedisUrl | None,
        Secret(_redact_url),
        Key(
            path="cache.redis", option="redis", help="Redis URL for the shared cache", metavar="URL"
        ),
    ] = None
    memory_entries: Annotated[
        PositiveInt,
        Key(
            path="cache.memory_entries",
            help="bound of the in-process descriptor and tag caches",
            metavar="N",
        ),
    ] = DEFAULT_MEMORY_ENTRIES
    max_size: Annotated[
        Size | None,
        Key(path="cache.max_size", help="evict beyond this size (20GiB)", metavar="SIZE"),
    ] = None
    high_watermark: Annotated[
        Fraction,
        Key(
            path="cache.high_watermark",
            help="share of max_size that starts eviction (0.9)",
            metavar="SHARE",
        ),
    ] = DEFAULT_HIGH_WATERMARK
    low_watermark: Annotated[
        Fraction,
        Key(
            path="cache.low_watermark",
            help="share of max_size eviction stops at (0.8)",
            metavar="SHARE",
        ),
    ] = DEFAULT_LOW_WATERMARK
    min_age: Annotated[
        Duration,
        Key(
            path="cache.min_age", help="never evict what was used this recently", metavar="DURATION"
        ),
    ] = DEFAULT_MIN_AGE
    pin: Annotated[
        tuple[Annotated[str, Meta(min_length=1)], ...],
        Expect("a list of patterns such as 'dockerhub/library/*:latest'"),
        Show(list),
        Key(path="cache.pin", overridable=False),
    ] = ()
    pin_refresh: Annotated[
        Duration | None,
        Key(path="cache.pin_refresh", help="revalidate pinned tags this often", metavar="DURATION"),
    ] = None
    gc_grace: Annotated[
        Duration,
        Key(
            path="cache.gc_grace",
            help="gc keeps unreferenced blobs younger than this",
            metavar="DURATION",
        ),
    ] = DEFAULT_GC_GRACE
    max_age: Annotated[
        Duration | None,
        Key(
            path="cache.max_age",
            help="gc removes images not pulled for this long",
            metavar="DURATION",
        ),
    ] = None
    min_free: Annotated[
        FreeSpace | None,
        Key(
            path="cache.min_free",
            help="free space below which nothing new is cached (a size, or a share such "
            "as 5 percent; default: the smaller of 1GiB and 5 percent)",
            metavar="SIZE",
        ),
    ] = None
    # The client side of the listener (nginx's client_header_timeout, keepalive_timeout,
    # send_timeout); see proxy.api.connections.
    header_timeout: Annotated[
        Duration,
        Key(
            path="server.header_timeout",
            help="time a client has to send a complete request header",
            metavar="DURATION",
        ),
    ] = DEFAULT_HEADER_TIMEOUT
    keepalive_timeout: Annotated[
        Duration,
        Key(
            path="server.keepalive_timeout",
            help="how long an idle keep-alive connection stays open",
            metavar="DURATION",
        ),
    ] = DEFAULT_KEEPALIVE_TIMEOUT
    send_timeout: Annotated[
        Duration,
        Key(
            path="server.send_timeout",
            help="how long a client may accept no response bytes before it is dropped",
            metavar="DURATION",
        ),
    ] = DEFAULT_SEND_TIMEOUT
    max_connections: Annotated[
        PositiveInt | None,
        Key(
            path="server.max_connections",
            help="bound of open client connections (default: from the open-files limit)",
            metavar="N",
        ),
    ] = None
    auth: Annotated[AuthSettings, _section(AuthSettings), _SectionShow, Key(overridable=False)] = (
        AuthSettings()
    )
    access: Annotated[
        AccessSettings, _section(AccessSettings), _SectionShow, Key(overridable=False)
    ] = AccessSettings()
    limits: Annotated[
        LimitSettings, _section(LimitSettings), _SectionShow, Key(overridable=False)
    ] = LimitSettings()
    cluster_advertise: Annotated[
        Advertise | None,
        Key(
            path="cluster.advertise",
            help="address the other replicas reach this one at (the pod IP and port)",
            metavar="HOST:PORT",
        ),
    ] = None
    cluster_secret_file: Annotated[
        FilePath | None,
        Key(
            path="cluster.secret_file",
            help="file with the secret the replicas share (signs peer requests)",
            metavar="FILE",
        ),
    ] = None
    cluster_lease_ttl: Annotated[
        Duration,
        Key(
            path="cluster.lease_ttl",
            help="life of a fetch lease without renewal",
            metavar="DURATION",
        ),
    ] = DEFAULT_LEASE_TTL
    shutdown_grace: Annotated[
        Duration,
        Key(help="on SIGTERM, how long responses in flight may finish", metavar="DURATION"),
    ] = DEFAULT_SHUTDOWN_GRACE
    # Parsed item by item (_parse_upstreams), never overridden as a whole.
    upstreams: Annotated[
        tuple[UpstreamSettings, ...], Key(overridable=False), Show(_show_upstreams)
    ] = ()

    @property
    def listen_host(self) -> str:
        return self.listen[0]

    @property
    def cluster(self) -> ClusterSettings:
        return ClusterSettings(
            self.cluster_advertise, self.cluster_secret_file, self.cluster_lease_ttl
        )

    @property
    def listen_port(self) -> int:
        return self.listen[1]

    @property
    def default_upstream(self) -> UpstreamSettings | None:
        for up in self.upstreams:
            if up.default:
                return up
        return None

    def to_dict(self) -> dict[str, Any]:
        """The file's form (``cache.dir`` nested under ``cache``), secrets redacted."""
        out: dict[str, Any] = {}
        for name, value in _shown(self).items():
            *sections, leaf = _KEYS[name].path.split(".")
            node = out
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = value
        return out

    def __repr__(self) -> str:
        return _repr(self)

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        *,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Build settings from a parsed YAML mapping, the environment and CLI overrides.

        ``overrides`` keys are the names in ``OPTIONS`` (``cache_dir``, ``redis``, ...);
        None values are ignored. ``environ`` supplies both the ``REGISTRY_PROXY_*``
        overrides and ``password_env`` look-ups (``os.environ`` when None).
        """
        env = os.environ if environ is None else environ
        flags = {name: value for name, value in (overrides or {}).items() if value is not None}
        for name in flags:
            if name not in _OPTIONS_BY_NAME:
                raise ConfigError("--" + name.replace("_", "-"), "unknown option")
        _check_keys(data, _FILE_KEYS, "")
        values: dict[str, Any] = {}
        for info in fields(cls):
            if info.name == "upstreams":
                continue
            picked = _pick(_KEYS[info.name], data, env, flags)
            if picked is not None:
                values[info.name] = _convert(info, *picked)
        builtin = data.get("upstreams") is None
        upstreams = _parse_upstreams(data.get("upstreams"), env)
        for option in OPTIONS:
            if option.owner is UpstreamSettings:
                picked = _pick_option(option, env, flags)
                if picked is not None:
                    value = _convert(option.field, *picked)
                    upstreams = _apply(option, value, upstreams, builtin=builtin)
        low = values.get("low_watermark", DEFAULT_LOW_WATERMARK)
        if low >= values.get("high_watermark", DEFAULT_HIGH_WATERMARK):
            raise ConfigError("cache.low_watermark", "must be below cache.high_watermark")
        return cls(**values, upstreams=upstreams)


# --- what is derived from the schema ------------------------------------------------------

_Keys: TypeAlias = dict[str, "_Keys"]  # a tree of YAML keys; a leaf is an empty dict
_M = TypeVar("_M")


@dataclass(frozen=True)
class Option:
    """An override: the environment variable ``env`` and the flag ``flag`` of one field."""

    name: str
    field: FieldInfo
    owner: type[Settings] | type[UpstreamSettings]
    key: Key

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _markers(type_: Any, kind: type[_M]) -> list[_M]:
    """The ``Annotated`` markers of ``kind`` on ``type_``, outermost first, or on a member
    of its union (``Address | None``)."""
    found: list[_M] = []
    if get_origin(type_) is Annotated:
        found += [m for m in type_.__metadata__ if isinstance(m, kind)]
        type_ = type_.__origin__
    if get_origin(type_) in (Union, UnionType):
        for member in get_args(type_):
            found += _markers(member, kind)
    return found


def _key(info: FieldInfo) -> Key:
    """The field's Key with its defaults filled in (a field without one has no option)."""
    key = next(iter(_markers(info.type, Key)), Key(overridable=False))
    return dataclasses.replace(key, path=key.path or info.name, option=key.option or info.name)


def _options() -> tuple[Option, ...]:
    options = []
    for owner in (Settings, UpstreamSettings):
        for info in fields(owner):
            declared = _markers(info.type, Key)
            if declared and (key := _key(info)).overridable:
                options.append(Option(key.option, info, owner, key))
    return tuple(options)


def _tree(paths: list[str]) -> _Keys:
    tree: _Keys = {}
    for path in paths:
        node = tree
        for part in path.split("."):
            node = node.setdefault(part, {})
    return tree


_KEYS: Final = {info.name: _key(info) for info in fields(Settings)}
_FILE_KEYS: Final = _tree([key.path for key in _KEYS.values()])
_UPSTREAM_KEYS: Final = _tree([info.name for info in fields(UpstreamSettings)])
OPTIONS: Final = _options()
_OPTIONS_BY_NAME: Final = {option.name: option for option in OPTIONS}


def _shown(struct: msgspec.Struct, kind: type[Show] = Show) -> dict[str, Any]:
    """Field name to value, rendered by the field's ``kind`` marker where it has one."""
    out: dict[str, Any] = {}
    for info in fields(struct):
        value = getattr(struct, info.name)
        show = _markers(info.type, kind)
        out[info.name] = show[0].render(value) if show and value is not None else value
    return out


def _repr(struct: Settings | UpstreamSettings) -> str:
    """Like msgspec's repr, with ``Secret`` fields rendered without the secret."""
    shown = ", ".join(f"{name}={value!r}" for name, value in _shown(struct, Secret).items())
    return f"{type(struct).__name__}({shown})"


# --- loading ------------------------------------------------------------------------------


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


def _check_keys(data: Mapping[str, Any], allowed: _Keys, prefix: str) -> None:
    """Every key of ``data`` is declared; a section (``cache``) is a mapping or null."""
    for name, value in data.items():
        if name not in allowed:
            raise ConfigError(f"{prefix}{name}", "unknown key")
        if allowed[name] and value is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{name}", "expected a mapping")
            _check_keys(value, allowed[name], f"{prefix}{name}.")


def _lookup(data: Mapping[str, Any], path: str) -> object:
    node: object = data
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _pick_option(
    option: Option, env: Mapping[str, str], flags: Mapping[str, Any]
) -> tuple[object, str, bool] | None:
    """The flag's value, else the variable's (empty means unset): (value, key, strict)."""
    if option.name in flags:
        return flags[option.name], option.flag, False
    if env.get(option.env):
        return env[option.env], option.env, False
    return None


def _pick(
    key: Key, data: Mapping[str, Any], env: Mapping[str, str], flags: Mapping[str, Any]
) -> tuple[object, str, bool] | None:
    """The value of highest precedence, with the key to name and whether it is text."""
    option = _OPTIONS_BY_NAME.get(key.option) if key.overridable else None
    picked = _pick_option(option, env, flags) if option is not None else None
    if picked is not None:
        return picked
    value = _lookup(data, key.path)
    return None if value is None else (value, key.path, True)


def _convert(info: FieldInfo, value: object, key: str, strict: bool) -> Any:
    """``value`` checked against the type of field ``info``, or ConfigError naming ``key``.

    ``strict`` is for YAML values, which have types; environment and flag values are text,
    converted leniently (``"10"`` is an integer there).
    """
    for parse in _markers(info.type, Parse):
        value = parse.fn(value, key)
    try:
        return msgspec.convert(value, info.type, strict=strict)
    except msgspec.ValidationError as exc:
        expect = _markers(info.type, Expect)
        raise ConfigError(key, f"expected {expect[0].text}" if expect else str(exc)) from None


def _apply(
    option: Option, value: object, upstreams: tuple[UpstreamSettings, ...], *, builtin: bool
) -> tuple[UpstreamSettings, ...]:
    """Set an upstream option on every upstream or on the default one.

    ``builtin``: the upstreams are the built-in Docker Hub default (the file has none).
    When its URL becomes another registry's, Docker Hub's aliases and name no longer
    describe it: it becomes ``upstream`` with none, so ``?ns=docker.io`` is refused
    instead of being served from another registry.
    """
    name = option.field.name
    result = []
    for up in upstreams:
        if option.key.applies_to == "every" or up.default:
            if builtin and name == "url" and value != DEFAULT_UPSTREAM_URL:
                up = replace(up, name=OVERRIDDEN_UPSTREAM_NAME, aliases=())
            up = replace(up, **{name: value})
        result.append(up)
    return tuple(result)


_BUILTIN_UPSTREAM: Final = UpstreamSettings(
    name=DEFAULT_UPSTREAM_NAME,
    url=DEFAULT_UPSTREAM_URL,
    aliases=DEFAULT_DOCKERHUB_ALIASES,
    default=True,
)


# --- upstreams: conversion item by item, then the rules across them ----------------------


def _parse_upstreams(raw: object, env: Mapping[str, str]) -> tuple[UpstreamSettings, ...]:
    if raw is None:
        return (_BUILTIN_UPSTREAM,)
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
    values: dict[str, Any] = {}
    for info in fields(UpstreamSettings):
        value = item.get(info.name)
        if value is not None or info.required:
            values[info.name] = _convert(info, value, f"{key}.{info.name}", True)
    up = UpstreamSettings(**values)
    password = _read_password(up, key, env)
    if password is not None and up.username is None:
        raise ConfigError(f"{key}.username", "a password is configured but no username")
    return replace(up, password=password)


def _read_password(up: UpstreamSettings, key: str, env: Mapping[str, str]) -> str | None:
    """The password from the one source configured: inline, a variable or a file."""
    sources = [s for s in ("password", "password_env", "password_file") if getattr(up, s)]
    if len(sources) > 1:
        raise ConfigError(f"{key}.{sources[1]}", f"set only one of {', '.join(sources)}")
    if up.password_env:
        if up.password_env not in env:
            raise ConfigError(
                f"{key}.password_env", f"environment variable {up.password_env} is not set"
            )
        return env[up.password_env]
    if up.password_file:
        try:
            return Path(up.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"{key}.password_file", f"cannot read {up.password_file}: {exc.strerror}"
            ) from None
    return up.password or None
