"""Settings: the YAML shape, durations, precedence, and errors that name their key."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from proxy.__main__ import main
from proxy.settings import (
    DEFAULT_DOCKERHUB_ALIASES,
    DEFAULT_LISTEN,
    DEFAULT_TAG_TTL,
    DEFAULT_UPSTREAM_NAME,
    DEFAULT_UPSTREAM_URL,
    ENV_PREFIX,
    OPTIONS,
    ClusterUrl,
    ConfigError,
    SentinelUrl,
    Settings,
    UpstreamSettings,
    load_settings,
    parse_duration,
    parse_listen,
)

SECRET = "s3cr3t-Pa55word"

ISSUE_YAML = """\
listen: 127.0.0.1:5001
log_level: debug
cache:
  dir: {cache_dir}
  redis: redis://localhost:6379/0
upstreams:
  - name: dockerhub
    url: https://registry-1.docker.io
    aliases: [docker.io, index.docker.io]
    default: true
    tag_ttl: 5m
    username: me
    password_env: DOCKERHUB_TOKEN
  - name: ghcr
    url: https://ghcr.io
    tag_ttl: 90s
  - name: private
    url: http://registry.internal:5000
    aliases: [registry.local]
    tag_ttl: 7d
    username: ci
    password_file: {password_file}
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def upstream(**item: Any) -> dict[str, Any]:
    """A valid upstream item, with ``item`` replacing or adding keys."""
    return {"name": "up", "url": "http://127.0.0.1:5001", **item}


def config_error(
    data: dict[str, Any],
    *,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping(data, environ=environ or {}, overrides=overrides)
    return info.value


@pytest.fixture
def issue_config(tmp_path: Path) -> Path:
    password_file = tmp_path / "private-password"
    password_file.write_text(SECRET + "\n", encoding="utf-8")
    return write_config(
        tmp_path,
        ISSUE_YAML.format(cache_dir=tmp_path / "cache", password_file=password_file),
    )


# --- the YAML shape ------------------------------------------------------------------


def test_issue_yaml_is_parsed(issue_config: Path, tmp_path: Path) -> None:
    settings = load_settings(issue_config, environ={"DOCKERHUB_TOKEN": "hub-token"})

    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 5001)
    assert settings.log_level == "debug"
    assert settings.cache_dir == tmp_path / "cache"
    assert settings.redis_url == "redis://localhost:6379/0"
    hub, ghcr, private = settings.upstreams
    assert hub == UpstreamSettings(
        name="dockerhub",
        url="https://registry-1.docker.io",
        aliases=("docker.io", "index.docker.io"),
        default=True,
        tag_ttl=300.0,
        username="me",
        password="hub-token",
        password_env="DOCKERHUB_TOKEN",
    )
    assert (ghcr.name, ghcr.url, ghcr.tag_ttl, ghcr.default) == (
        "ghcr",
        "https://ghcr.io",
        90.0,
        False,
    )
    assert ghcr.username is None and ghcr.password is None
    assert private.tag_ttl == 7 * 86400
    assert (private.username, private.password) == ("ci", SECRET)
    assert settings.default_upstream is hub


def test_namespaces_are_url_host_and_aliases_lower_cased() -> None:
    settings = Settings.from_mapping(
        {"upstreams": [upstream(url="http://Registry.Example:5001", aliases=["Mirror.Example"])]},
        environ={},
    )
    assert settings.upstreams[0].host == "registry.example:5001"
    assert settings.upstreams[0].namespaces() == {"registry.example:5001", "mirror.example"}


def test_url_trailing_slash_is_dropped() -> None:
    settings = Settings.from_mapping({"upstreams": [upstream(url="https://ghcr.io/")]}, environ={})
    assert settings.upstreams[0].url == "https://ghcr.io"


def test_defaults_without_a_file() -> None:
    settings = load_settings(None, environ={})
    assert (settings.listen_host, settings.listen_port) == parse_listen(DEFAULT_LISTEN, "listen")
    assert settings.redis_url is None
    assert settings.log_level == "info"
    (hub,) = settings.upstreams
    assert hub.name == DEFAULT_UPSTREAM_NAME
    assert hub.url == DEFAULT_UPSTREAM_URL
    assert hub.aliases == DEFAULT_DOCKERHUB_ALIASES
    assert hub.default is True
    assert hub.tag_ttl == DEFAULT_TAG_TTL


def test_an_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(write_config(tmp_path, ""), environ={}) == load_settings(None, environ={})


def test_a_single_upstream_becomes_the_default() -> None:
    settings = Settings.from_mapping({"upstreams": [upstream()]}, environ={})
    assert settings.upstreams[0].default is True


def test_two_upstreams_without_default_have_none() -> None:
    settings = Settings.from_mapping(
        {"upstreams": [upstream(name="a"), upstream(name="b", url="http://127.0.0.1:5002")]},
        environ={},
    )
    assert settings.default_upstream is None


def test_settings_are_frozen() -> None:
    settings = load_settings(None, environ={})
    with pytest.raises(AttributeError):
        settings.log_level = "debug"  # type: ignore[misc]


# --- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (300, 300.0),
        (2.5, 2.5),
        ("300", 300.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("500ms", 0.5),
        (" 5m ", 300.0),
        (0, 0.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value, "some.key") == seconds


@pytest.mark.parametrize(
    "value", ["5 minutes", "5w", "-5", "-5m", "", "m", "1e3", True, None, [5], {"m": 5}, -1]
)
def test_bad_duration_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "upstreams[3].tag_ttl")
    assert info.value.key == "upstreams[3].tag_ttl"


def test_nan_duration_is_refused() -> None:
    # YAML's `.nan` reaches parse_duration as a float; a NaN TTL makes every
    # comparison false (a tag is never fresh), which no operator means.
    with pytest.raises(ConfigError):
        parse_duration(float("nan"), "upstreams[0].tag_ttl")


@pytest.mark.parametrize(("text", "seconds"), [("300", 300.0), ("90s", 90.0), ("7d", 604800.0)])
def test_tag_ttl_from_yaml(tmp_path: Path, text: str, seconds: float) -> None:
    path = write_config(
        tmp_path,
        f"""\
        upstreams:
          - name: up
            url: http://127.0.0.1:5001
            tag_ttl: {text}
        """,
    )
    assert load_settings(path, environ={}).upstreams[0].tag_ttl == seconds


# --- precedence: defaults < file < environment < overrides ---------------------------


@pytest.fixture
def precedence_file(tmp_path: Path) -> Path:
    return write_config(
        tmp_path,
        """\
        listen: 127.0.0.1:5001
        log_level: warning
        cache:
          dir: /from/file
          redis: redis://file:6379/0
        upstreams:
          - name: up
            url: http://127.0.0.1:7001
            tag_ttl: 1m
        """,
    )


def test_file_overrides_defaults(precedence_file: Path) -> None:
    settings = load_settings(precedence_file, environ={})
    assert settings.listen_port == 5001
    assert settings.log_level == "warning"
    assert settings.cache_dir == Path("/from/file")
    assert settings.redis_url == "redis://file:6379/0"
    assert settings.upstreams[0].url == "http://127.0.0.1:7001"
    assert settings.upstreams[0].tag_ttl == 60.0


ENV = {
    "REGISTRY_PROXY_LISTEN": "127.0.0.1:5002",
    "REGISTRY_PROXY_LOG_LEVEL": "ERROR",
    "REGISTRY_PROXY_CACHE_DIR": "/from/env",
    "REGISTRY_PROXY_REDIS": "redis://env:6379/0",
    "REGISTRY_PROXY_UPSTREAM": "http://127.0.0.1:7002",
    "REGISTRY_PROXY_TAG_TTL": "2m",
}


def test_environment_overrides_file(precedence_file: Path) -> None:
    settings = load_settings(precedence_file, environ=ENV)
    assert settings.listen_port == 5002
    assert settings.log_level == "error"
    assert settings.cache_dir == Path("/from/env")
    assert settings.redis_url == "redis://env:6379/0"
    assert settings.upstreams[0].url == "http://127.0.0.1:7002"
    assert settings.upstreams[0].name == "up"
    assert settings.upstreams[0].tag_ttl == 120.0


def test_overrides_beat_environment(precedence_file: Path) -> None:
    overrides = {
        "listen": "127.0.0.1:5003",
        "log_level": "debug",
        "cache_dir": "/from/flag",
        "redis": "redis://flag:6379/0",
        "upstream": "http://127.0.0.1:7003",
        "tag_ttl": "3m",
    }
    settings = load_settings(precedence_file, environ=ENV, overrides=overrides)
    assert settings.listen_port == 5003
    assert settings.log_level == "debug"
    assert settings.cache_dir == Path("/from/flag")
    assert settings.redis_url == "redis://flag:6379/0"
    assert settings.upstreams[0].url == "http://127.0.0.1:7003"
    assert settings.upstreams[0].tag_ttl == 180.0


def test_none_overrides_and_empty_environment_values_are_ignored(precedence_file: Path) -> None:
    settings = load_settings(
        precedence_file,
        environ={"REGISTRY_PROXY_LISTEN": ""},
        overrides={"listen": None, "log_level": None},
    )
    assert settings.listen_port == 5001
    assert settings.log_level == "warning"


def test_environment_is_read_from_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REGISTRY_PROXY_LISTEN", "127.0.0.1:5009")
    assert load_settings(None).listen_port == 5009


def test_upstream_override_on_builtin_default_drops_docker_hub_aliases() -> None:
    settings = Settings.from_mapping({}, environ={}, overrides={"upstream": "http://10.0.0.1:5000"})
    (up,) = settings.upstreams
    assert up.url == "http://10.0.0.1:5000"
    assert up.default is True
    assert up.aliases == ()
    assert up.name != DEFAULT_UPSTREAM_NAME
    assert up.namespaces() == {"10.0.0.1:5000"}
    assert not up.namespaces() & {"docker.io", "index.docker.io", "registry-1.docker.io"}


def test_upstream_override_with_docker_hub_url_keeps_docker_hub() -> None:
    settings = Settings.from_mapping({}, environ={}, overrides={"upstream": DEFAULT_UPSTREAM_URL})
    (up,) = settings.upstreams
    assert up.name == DEFAULT_UPSTREAM_NAME
    assert up.aliases == DEFAULT_DOCKERHUB_ALIASES


def test_upstream_override_on_configured_upstreams_only_moves_the_default() -> None:
    data = {
        "upstreams": [
            upstream(name="a", url="http://127.0.0.1:5001", aliases=["a.example"], default=True),
            upstream(name="b", url="http://127.0.0.1:5002"),
        ]
    }
    settings = Settings.from_mapping(data, environ={}, overrides={"upstream": "http://10.0.0.9"})
    a, b = settings.upstreams
    assert (a.name, a.url, a.aliases) == ("a", "http://10.0.0.9", ("a.example",))
    assert b.url == "http://127.0.0.1:5002"


def test_upstream_override_from_environment_drops_docker_hub_aliases() -> None:
    settings = Settings.from_mapping(
        {}, environ={"REGISTRY_PROXY_UPSTREAM": "http://127.0.0.1:5000"}
    )
    assert settings.upstreams[0].aliases == ()


# --- every bad value names its key --------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"listne": "x"}, "listne"),
        ({"cache": {"dri": "/x"}}, "cache.dri"),
        ({"cache": "/x"}, "cache"),
        ({"upstreams": [upstream(pasword="x")]}, "upstreams[0].pasword"),
        ({"listen": "5000"}, "listen"),
        ({"listen": "host:http"}, "listen"),
        ({"listen": "host:70000"}, "listen"),
        ({"log_level": "loud"}, "log_level"),
        ({"cache": {"dir": ""}}, "cache.dir"),
        ({"cache": {"redis": "http://localhost:6379"}}, "cache.redis"),
        ({"cache": {"redis": "localhost:6379"}}, "cache.redis"),
        ({"cache": {"memory_entries": 0}}, "cache.memory_entries"),
        ({"cache": {"memory_entries": True}}, "cache.memory_entries"),
        ({"upstreams": []}, "upstreams"),
        ({"upstreams": {"name": "up"}}, "upstreams"),
        ({"upstreams": ["http://x"]}, "upstreams[0]"),
        ({"upstreams": [upstream(name="Docker Hub")]}, "upstreams[0].name"),
        ({"upstreams": [upstream(name=None)]}, "upstreams[0].name"),
        ({"upstreams": [upstream(url="ftp://example.com")]}, "upstreams[0].url"),
        ({"upstreams": [upstream(url="example.com")]}, "upstreams[0].url"),
        ({"upstreams": [upstream(url="https://example.com/v2")]}, "upstreams[0].url"),
        ({"upstreams": [upstream(url="https://u:p@example.com")]}, "upstreams[0].url"),
        ({"upstreams": [upstream(url=5)]}, "upstreams[0].url"),
        ({"upstreams": [upstream(aliases="docker.io")]}, "upstreams[0].aliases"),
        ({"upstreams": [upstream(aliases=[""])]}, "upstreams[0].aliases"),
        ({"upstreams": [upstream(default="yes")]}, "upstreams[0].default"),
        ({"upstreams": [upstream(tag_ttl="soon")]}, "upstreams[0].tag_ttl"),
        ({"upstreams": [upstream(read_timeout="-1s")]}, "upstreams[0].read_timeout"),
        ({"upstreams": [upstream(username=7)]}, "upstreams[0].username"),
        ({"upstreams": [upstream(password="x")]}, "upstreams[0].username"),
        (
            {"upstreams": [upstream(username="u", password="x", password_env="Y")]},
            "upstreams[0].password_env",
        ),
        (
            {
                "upstreams": [
                    upstream(name="a"),
                    upstream(name="a", url="http://127.0.0.1:5002"),
                ]
            },
            "upstreams[1].name",
        ),
        (
            {
                "upstreams": [
                    upstream(name="a", aliases=["mirror.example"]),
                    upstream(name="b", url="http://127.0.0.1:5002", aliases=["Mirror.Example"]),
                ]
            },
            "upstreams[1].aliases",
        ),
        (
            {
                "upstreams": [
                    upstream(name="a", url="http://127.0.0.1:5001"),
                    upstream(name="b", url="http://127.0.0.1:5002", aliases=["127.0.0.1:5001"]),
                ]
            },
            "upstreams[1].aliases",
        ),
        (
            {
                "upstreams": [
                    upstream(name="a", default=True),
                    upstream(name="b", url="http://127.0.0.1:5002", default=True),
                ]
            },
            "upstreams",
        ),
    ],
)
def test_bad_file_value_names_the_dotted_key(data: dict[str, Any], key: str) -> None:
    error = config_error(data)
    assert error.key == key
    assert str(error).startswith(key + ":")
    assert isinstance(error, ValueError)


def test_upstream_name_with_trailing_newline_is_refused() -> None:
    # `$` in _UPSTREAM_NAME matches before a final newline.
    error = config_error({"upstreams": [upstream(name="dockerhub\n")]})
    assert error.key == "upstreams[0].name"


def test_missing_password_env_variable_names_the_key_and_variable() -> None:
    error = config_error(
        {"upstreams": [upstream(username="u", password_env="UPSTREAM_PASSWORD")]},
        environ={"OTHER": "x"},
    )
    assert error.key == "upstreams[0].password_env"
    assert "UPSTREAM_PASSWORD" in error.message


def test_password_env_is_read_from_environ() -> None:
    settings = Settings.from_mapping(
        {"upstreams": [upstream(username="u", password_env="UPSTREAM_PASSWORD")]},
        environ={"UPSTREAM_PASSWORD": SECRET},
    )
    assert settings.upstreams[0].password == SECRET


def test_unreadable_password_file_names_the_key(tmp_path: Path) -> None:
    error = config_error(
        {"upstreams": [upstream(username="u", password_file=str(tmp_path / "missing"))]}
    )
    assert error.key == "upstreams[0].password_file"


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"REGISTRY_PROXY_LOG_LEVEL": "loud"}, "REGISTRY_PROXY_LOG_LEVEL"),
        ({"REGISTRY_PROXY_LISTEN": "nowhere"}, "REGISTRY_PROXY_LISTEN"),
        ({"REGISTRY_PROXY_REDIS": "memcached://x"}, "REGISTRY_PROXY_REDIS"),
        ({"REGISTRY_PROXY_TAG_TTL": "forever"}, "REGISTRY_PROXY_TAG_TTL"),
        ({"REGISTRY_PROXY_UPSTREAM": "registry.example"}, "REGISTRY_PROXY_UPSTREAM"),
    ],
)
def test_bad_environment_value_names_the_variable(environ: dict[str, str], key: str) -> None:
    assert config_error({}, environ=environ).key == key


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"log_level": "loud"}, "--log-level"),
        ({"listen": "nowhere"}, "--listen"),
        ({"redis": "memcached://x"}, "--redis"),
        ({"tag_ttl": "forever"}, "--tag-ttl"),
        ({"upstream": "registry.example"}, "--upstream"),
        ({"cache_dir": ""}, "--cache-dir"),
    ],
)
def test_bad_override_names_the_flag(overrides: dict[str, Any], key: str) -> None:
    assert config_error({}, overrides=overrides).key == key


@pytest.mark.parametrize(
    ("text", "key"),
    [("listen: [unclosed", "--config"), ("- a\n- b\n", "--config")],
)
def test_bad_file_names_the_config_flag(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write_config(tmp_path, text), environ={})
    assert info.value.key == key


def test_missing_file_names_the_config_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "absent.yaml", environ={})
    assert info.value.key == "--config"


# --- secrets ---------------------------------------------------------------------------


def test_password_is_never_in_to_dict_or_repr(issue_config: Path) -> None:
    settings = load_settings(issue_config, environ={"DOCKERHUB_TOKEN": SECRET})
    assert settings.upstreams[0].password == SECRET
    assert settings.upstreams[2].password == SECRET

    dumped = yaml.safe_dump(settings.to_dict())
    assert SECRET not in dumped
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    for up in settings.upstreams:
        assert SECRET not in repr(up)
        assert SECRET not in str(up.to_dict())
    # What is configured is still visible, minus the secret itself.
    hub = settings.to_dict()["upstreams"][0]
    assert hub["password_env"] == "DOCKERHUB_TOKEN"
    assert hub["password"] == "<redacted>"
    assert hub["username"] == "me"


def test_inline_password_is_redacted() -> None:
    settings = Settings.from_mapping(
        {"upstreams": [upstream(username="u", password=SECRET)]}, environ={}
    )
    assert SECRET not in repr(settings)
    assert SECRET not in yaml.safe_dump(settings.to_dict())


def test_redis_password_is_redacted_in_to_dict() -> None:
    settings = Settings.from_mapping(
        {"cache": {"redis": f"redis://user:{SECRET}@redis.internal:6379/0"}}, environ={}
    )
    assert settings.redis_url == f"redis://user:{SECRET}@redis.internal:6379/0"
    assert settings.to_dict()["cache"]["redis"] == "redis://user:<redacted>@redis.internal:6379/0"


def test_redis_password_is_not_in_repr() -> None:
    settings = Settings.from_mapping(
        {"cache": {"redis": f"redis://:{SECRET}@redis.internal:6379/0"}}, environ={}
    )
    assert SECRET not in repr(settings)


@pytest.mark.parametrize(
    ("url", "nodes", "username", "password", "tls"),
    [
        ("redis+cluster://10.0.0.1:7000/", (("10.0.0.1", 7000),), None, None, False),
        (
            "redis+cluster://:p%40ss@a:7000,b,[fd00::1]:7001",
            (("a", 7000), ("b", 6379), ("fd00::1", 7001)),
            None,
            "p@ss",
            False,
        ),
        ("rediss+cluster://me:pw@a:7000/0", (("a", 7000),), "me", "pw", True),
    ],
)
def test_cluster_urls_name_their_startup_nodes(
    url: str,
    nodes: tuple[tuple[str, int], ...],
    username: str | None,
    password: str | None,
    tls: bool,
) -> None:
    assert ClusterUrl.parse(url) == ClusterUrl(nodes, username, password, tls)
    assert Settings.from_mapping({"cache": {"redis": url}}, environ={}).redis_url == url


@pytest.mark.parametrize(
    ("url", "wrong"),
    [
        ("redis+cluster://", "bad cluster node address ''"),
        ("redis+cluster://a:7000,,b", "bad cluster node address ''"),
        ("redis+cluster://a:port/", "bad cluster node address 'a:port'"),
        ("redis+cluster://a:70000/", "bad cluster node address 'a:70000'"),
        ("redis+cluster://fd00::1/", "bad cluster node address 'fd00::1'"),
        ("redis+cluster://a:7000/1", "no /<db>"),  # a cluster has one database
        ("redis+cluster://a:7000/?db=1", "no query"),
    ],
)
def test_bad_cluster_urls_fail_at_start_up_naming_the_key(url: str, wrong: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"cache": {"redis": url}}, environ={})
    assert info.value.key == "cache.redis"
    assert wrong in str(info.value)
    assert "redis+cluster://host:port" in str(info.value)  # the form, as an example


def test_sentinel_urls_name_their_sentinels_service_and_db() -> None:
    parsed = SentinelUrl.parse("redis+sentinel://:pw@s1,s2:26380,[fd00::1]:26381/mymaster/2")
    assert parsed == SentinelUrl(
        (("s1", 26379), ("s2", 26380), ("fd00::1", 26381)), "mymaster", 2, "pw"
    )
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"cache": {"redis": "redis+sentinel://s1:x/m"}}, environ={})
    assert info.value.key == "cache.redis"
    assert "bad sentinel address 's1:x'" in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"redis+cluster://:{SECRET}@a:7000,b:7001/",
            "redis+cluster://:<redacted>@a:7000,b:7001/",
        ),
        (
            f"rediss+cluster://me:{SECRET}@a:7000,[fd00::1]:7001",
            "rediss+cluster://me:<redacted>@a:7000,[fd00::1]:7001",
        ),
        (
            f"redis+sentinel://:{SECRET}@s1:26379,s2/mymaster/0",
            "redis+sentinel://:<redacted>@s1:26379,s2/mymaster/0",
        ),
    ],
)
def test_cluster_and_sentinel_passwords_are_redacted(
    url: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings.from_mapping({"cache": {"redis": url}}, environ={})
    assert settings.to_dict()["cache"]["redis"] == shown
    assert SECRET not in repr(settings)
    assert main(["check-config", "--redis", url]) == 0
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err
    assert shown in printed.out


def test_to_dict_round_trips_through_from_mapping(tmp_path: Path) -> None:
    settings = Settings.from_mapping(
        {
            "listen": "[::1]:5005",
            "log_level": "warning",
            "cache": {"dir": str(tmp_path), "memory_entries": 10},
            "upstreams": [
                upstream(name="a", aliases=["a.example"], tag_ttl="90s", default=True),
                upstream(name="b", url="https://ghcr.io"),
            ],
        },
        environ={},
    )
    assert settings.to_dict()["listen"] == "[::1]:5005"
    assert Settings.from_mapping(settings.to_dict(), environ={}) == settings


# --- every declared key is reachable as designed --------------------------------------

# The spec, written independently of the declaration: for each field of Settings, its
# YAML path, its option (environment variable and flag), a value as an operator writes
# it, and the resulting attribute. YAML gets the text as YAML would parse it.
TOP_LEVEL = {
    "listen": ("listen", "listen", "127.0.0.1:6001", ("127.0.0.1", 6001)),
    "log_level": ("log_level", "log_level", "debug", "debug"),
    "log_format": ("log_format", "log_format", "json", "json"),
    "metrics_listen": ("metrics_listen", "metrics_listen", "localhost:9091", ("localhost", 9091)),
    "workers": ("workers", "workers", "3", 3),
    "cache_dir": ("cache.dir", "cache_dir", "/some/dir", Path("/some/dir")),
    "redis_url": ("cache.redis", "redis", "redis://h:6379/1", "redis://h:6379/1"),
    "memory_entries": ("cache.memory_entries", "memory_entries", "123", 123),
    "max_size": ("cache.max_size", "max_size", "2KiB", 2048),
    "high_watermark": ("cache.high_watermark", "high_watermark", "0.95", 0.95),
    "low_watermark": ("cache.low_watermark", "low_watermark", "50%", 0.5),
    "min_age": ("cache.min_age", "min_age", "10m", 600.0),
    "pin_refresh": ("cache.pin_refresh", "pin_refresh", "1h", 3600.0),
    "gc_grace": ("cache.gc_grace", "gc_grace", "2h", 7200.0),
    "max_age": ("cache.max_age", "max_age", "30d", 30 * 86400.0),
    "min_free": ("cache.min_free", "min_free", "5%", 0.05),
    "header_timeout": ("server.header_timeout", "header_timeout", "5s", 5.0),
    "keepalive_timeout": ("server.keepalive_timeout", "keepalive_timeout", "2m", 120.0),
    "send_timeout": ("server.send_timeout", "send_timeout", "90s", 90.0),
    "max_connections": ("server.max_connections", "max_connections", "700", 700),
    "shutdown_grace": ("shutdown_grace", "shutdown_grace", "10s", 10.0),
    "cluster_advertise": (
        "cluster.advertise",
        "cluster_advertise",
        "10.1.2.3:5000",
        "http://10.1.2.3:5000",
    ),
    "cluster_secret_file": (
        "cluster.secret_file",
        "cluster_secret_file",
        "/run/secret",
        Path("/run/secret"),
    ),
    "cluster_lease_ttl": ("cluster.lease_ttl", "cluster_lease_ttl", "3s", 3.0),
}
# Options that set a field of the upstreams: name -> (field, text, value, which upstreams)
UPSTREAM_OPTIONS = {
    "tag_ttl": ("tag_ttl", "90s", 90.0, "every"),
    "upstream": ("url", "http://127.0.0.1:7009", "http://127.0.0.1:7009", "default"),
}
# Every item key of an upstream from YAML: field -> (written value, attribute).
UPSTREAM_KEYS: dict[str, tuple[object, object]] = {
    "name": ("mirror", "mirror"),
    "url": ("http://127.0.0.1:7001/", "http://127.0.0.1:7001"),
    "aliases": (["a.example"], ("a.example",)),
    "default": (True, True),
    "tag_ttl": ("1m", 60.0),
    "connect_timeout": ("2s", 2.0),
    "read_timeout": ("500ms", 0.5),
    "max_stale": ("1d", 86400.0),
    "stale_on_404": (True, True),
    "ratelimit_floor": (3, 3),
    "failure_threshold": (4, 4),
    "cooldown": ("1h", 3600.0),
    "retries": (0, 0),
    "visibility": ("private", "private"),
    "passthrough": (False, False),
    "username": ("me", "me"),
    "password": (SECRET, SECRET),
    "password_env": ("UPSTREAM_PASSWORD", "UPSTREAM_PASSWORD"),
    "password_file": ("<file>", "<file>"),
}


def nested(path: str, value: object) -> dict[str, Any]:
    *sections, leaf = path.split(".")
    data: dict[str, Any] = {leaf: value}
    for section in reversed(sections):
        data = {section: data}
    return data


def test_the_spec_covers_every_declared_key() -> None:
    """A field or option added to the declaration must be added here, and so be tested."""
    declared = {f.name for f in msgspec.structs.fields(Settings)} - {"upstreams"}
    # The access-control sections have no options; tests/unit/access/test_config.py
    # covers them key by key.
    assert declared == set(TOP_LEVEL) | {"auth", "access", "limits", "pin"}
    assert {f.name for f in msgspec.structs.fields(UpstreamSettings)} == set(UPSTREAM_KEYS)
    options = {option for _, option, _, _ in TOP_LEVEL.values()} | set(UPSTREAM_OPTIONS)
    assert {option.name for option in OPTIONS} == options


CACHE_MANAGEMENT_OPTIONS = {
    "HIGH_WATERMARK",
    "LOW_WATERMARK",
    "MIN_AGE",
    "PIN_REFRESH",
    "GC_GRACE",
    "MAX_AGE",
}


def test_cache_management_defaults_and_rules() -> None:
    settings = Settings.from_mapping({}, environ={})
    assert (settings.high_watermark, settings.low_watermark) == (0.9, 0.8)
    assert settings.min_age == 300.0 and settings.pin == () and settings.pin_refresh is None
    pinned = Settings.from_mapping({"cache": {"pin": ["up/library/*:latest"]}}, environ={})
    assert pinned.pin == ("up/library/*:latest",)
    with pytest.raises(ConfigError) as refused:
        Settings.from_mapping({"cache": {"low_watermark": "95%"}}, environ={})
    assert refused.value.key == "cache.low_watermark"
    for bad in ("0%", "101%", 1.5, "lots", True):
        with pytest.raises(ConfigError) as wrong:
            Settings.from_mapping({"cache": {"high_watermark": bad}}, environ={})
        assert wrong.value.key == "cache.high_watermark"
    with pytest.raises(ConfigError) as not_list:
        Settings.from_mapping({"cache": {"pin": "up/x:latest"}}, environ={})
    assert not_list.value.key == "cache.pin"


def test_every_variable_of_before_still_exists_and_the_new_ones_are_named() -> None:
    names = {option.env for option in OPTIONS}
    before = {"LISTEN", "METRICS_LISTEN", "UPSTREAM", "CACHE_DIR", "MAX_SIZE", "REDIS"}
    before |= {"TAG_TTL", "LOG_LEVEL", "LOG_FORMAT"}
    new = {"MEMORY_ENTRIES", "MIN_FREE", "HEADER_TIMEOUT", "KEEPALIVE_TIMEOUT", "SEND_TIMEOUT"}
    new |= {"MAX_CONNECTIONS"} | CACHE_MANAGEMENT_OPTIONS
    new |= {"SHUTDOWN_GRACE", "CLUSTER_ADVERTISE", "CLUSTER_SECRET_FILE", "CLUSTER_LEASE_TTL"}
    new |= {"WORKERS"}
    assert names == {ENV_PREFIX + name for name in before | new}
    assert {option.flag for option in OPTIONS} == {
        "--" + name.lower().replace("_", "-") for name in before | new
    }


@pytest.mark.parametrize(
    ("written", "value", "shown"),
    [("5%", 0.05, "5%"), ("2GiB", 2 << 30, 2 << 30), (0, 0, 0), ("0.5%", 0.005, "0.5%")],
)
def test_min_free_is_a_size_or_a_share(written: object, value: float, shown: object) -> None:
    settings = Settings.from_mapping({"cache": {"min_free": written}}, environ={})
    assert settings.min_free == value
    assert settings.to_dict()["cache"]["min_free"] == shown
    assert Settings.from_mapping(settings.to_dict(), environ={}) == settings


@pytest.mark.parametrize("written", ["100%", "-1%", "x%", "lots", -5])
def test_a_bad_min_free_names_its_key(written: object) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"cache": {"min_free": written}}, environ={})
    assert info.value.key == "cache.min_free"


@pytest.mark.parametrize("field", sorted(TOP_LEVEL))
def test_top_level_key_from_yaml(field: str) -> None:
    path, _, text, value = TOP_LEVEL[field]
    settings = Settings.from_mapping(nested(path, yaml.safe_load(text)), environ={})
    assert getattr(settings, field) == value


@pytest.mark.parametrize("field", sorted(TOP_LEVEL))
def test_top_level_key_from_environment(field: str) -> None:
    _, option, text, value = TOP_LEVEL[field]
    settings = Settings.from_mapping({}, environ={ENV_PREFIX + option.upper(): text})
    assert getattr(settings, field) == value


@pytest.mark.parametrize("field", sorted(TOP_LEVEL))
def test_top_level_key_from_flag(field: str, capsys: pytest.CaptureFixture[str]) -> None:
    path, option, text, value = TOP_LEVEL[field]
    assert main(["check-config", "--" + option.replace("_", "-"), text]) == 0
    printed = _at(yaml.safe_load(capsys.readouterr().out), path)
    assert printed == _at(Settings(**{field: value}).to_dict(), path)
    assert printed != _at(Settings().to_dict(), path)


def _at(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data[part]
    return data


@pytest.mark.parametrize("name", sorted(UPSTREAM_OPTIONS))
def test_upstream_option_from_environment_and_flag(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    field, text, value, applies_to = UPSTREAM_OPTIONS[name]
    data = {"upstreams": [upstream(name="a", default=True), upstream(name="b", url="http://h")]}
    from_env = Settings.from_mapping(data, environ={ENV_PREFIX + name.upper(): text})
    from_flag = Settings.from_mapping(data, environ={}, overrides={name: text})
    for settings in (from_env, from_flag):
        a, b = settings.upstreams
        assert getattr(a, field) == value
        assert (getattr(b, field) == value) is (applies_to == "every")
    assert main(["check-config", "--" + name.replace("_", "-"), text]) == 0
    (printed,) = yaml.safe_load(capsys.readouterr().out)["upstreams"]
    assert printed[field] == value


@pytest.mark.parametrize("field", sorted(UPSTREAM_KEYS))
def test_upstream_key_from_yaml(field: str, tmp_path: Path) -> None:
    written, value = UPSTREAM_KEYS[field]
    password_file = tmp_path / "password"
    password_file.write_text(SECRET, encoding="utf-8")
    if written == "<file>":
        written = value = str(password_file)
    item = upstream(**{field: written})
    if field.startswith("password"):
        item["username"] = "u"
    settings = Settings.from_mapping({"upstreams": [item]}, environ={"UPSTREAM_PASSWORD": SECRET})
    assert getattr(settings.upstreams[0], field) == value
    if field.startswith("password"):
        assert settings.upstreams[0].password == SECRET


# --- memory_entries, new in the environment and on the command line --------------------


def test_memory_entries_from_environment_and_flag() -> None:
    env = {"REGISTRY_PROXY_MEMORY_ENTRIES": "500"}
    assert Settings.from_mapping({}, environ=env).memory_entries == 500
    data = {"cache": {"memory_entries": 10}}
    assert Settings.from_mapping(data, environ=env).memory_entries == 500
    flags = {"memory_entries": "7"}
    assert Settings.from_mapping(data, environ=env, overrides=flags).memory_entries == 7


@pytest.mark.parametrize("text", ["0", "-3", "many", "1.5", ""])
def test_bad_memory_entries_names_the_variable_and_the_flag(text: str) -> None:
    if text:  # an empty variable means unset
        env = {"REGISTRY_PROXY_MEMORY_ENTRIES": text}
        assert config_error({}, environ=env).key == "REGISTRY_PROXY_MEMORY_ENTRIES"
    assert config_error({}, overrides={"memory_entries": text}).key == "--memory-entries"


def test_memory_entries_as_text_in_yaml_is_refused() -> None:
    # YAML has types: a quoted number is a mistake there, unlike in a variable.
    assert config_error({"cache": {"memory_entries": "10"}}).key == "cache.memory_entries"


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"REGISTRY_PROXY_LOG_FORMAT": "xml"}, "REGISTRY_PROXY_LOG_FORMAT"),
        ({"REGISTRY_PROXY_METRICS_LISTEN": "nowhere"}, "REGISTRY_PROXY_METRICS_LISTEN"),
        ({"REGISTRY_PROXY_MAX_SIZE": "huge"}, "REGISTRY_PROXY_MAX_SIZE"),
        ({"REGISTRY_PROXY_MEMORY_ENTRIES": "0"}, "REGISTRY_PROXY_MEMORY_ENTRIES"),
    ],
)
def test_bad_environment_value_names_the_variable_for_every_option(
    environ: dict[str, str], key: str
) -> None:
    assert config_error({}, environ=environ).key == key


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"log_format": "xml"}, "--log-format"),
        ({"metrics_listen": "nowhere"}, "--metrics-listen"),
        ({"max_size": "huge"}, "--max-size"),
        ({"memory_entries": "0"}, "--memory-entries"),
    ],
)
def test_bad_override_names_the_flag_for_every_option(overrides: dict[str, Any], key: str) -> None:
    error = config_error({}, overrides=overrides)
    assert error.key == key
    assert str(error).startswith(key + ": ")


def test_an_unknown_override_is_refused() -> None:
    assert config_error({}, overrides={"cache_size": "1GiB"}).key == "--cache-size"


def test_null_in_the_file_means_unset() -> None:
    data = {"listen": None, "cache": None, "upstreams": [upstream(tag_ttl=None, aliases=None)]}
    settings = Settings.from_mapping(data, environ={})
    assert settings.listen_port == Settings().listen_port
    assert settings.upstreams[0].tag_ttl == DEFAULT_TAG_TTL
    assert settings.upstreams[0].aliases == ()
