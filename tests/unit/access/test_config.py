"""The access-control settings: ``auth``, ``access``, ``limits`` and the upstream keys
``visibility`` and ``passthrough``; defaults, every key, errors that name the key, the
round trip through ``to_dict`` and what ``check-config`` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.__main__ import main
from proxy.settings import (
    DEFAULT_DECISION_TTL,
    DEFAULT_PROBE_RATE,
    DEFAULT_RULES,
    DEFAULT_TOKEN_EXPIRY,
    DEFAULT_TOKEN_SERVICE,
    DEFAULT_VISIBILITY_TTL,
    AccessRule,
    AccessSettings,
    AuthSettings,
    ConfigError,
    LimitSettings,
    Rate,
    Settings,
    TokenSettings,
    UpstreamSettings,
)

SECRET = "upstream-Pa55word-secret"
REDIS_SECRET = "redis-Pa55word-secret"

FULL: dict[str, Any] = {
    "auth": {
        "htpasswd": "/etc/registry-proxy/htpasswd",
        "token": {
            "key": "/etc/registry-proxy/token.pem",
            "expiry": "5m",
            "service": "proxy.example",
            "realm": "https://proxy.example/token",
        },
        "trusted_proxies": ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"],
        "decision_ttl": "90s",
        "visibility_ttl": "2h",
        "probe_rate": "30/m",
    },
    "access": {
        "groups": {"ci": ["robot-ci", "robot-2"], "ops": ["carol"]},
        "admins": ["ops"],
        "rules": [
            {"repos": "**", "pull": ["anonymous"]},
            {"repos": "private/acme/**", "pull": ["alice", "group:ci", "passthrough"]},
            {"repos": "private/home/${user}/**", "pull": ["authenticated"]},
        ],
    },
    "limits": {"requests": "50/s", "cold_fetches": "200/6h", "cold_bytes": "10GiB/6h"},
}


def settings(data: dict[str, Any]) -> Settings:
    return Settings.from_mapping(data, environ={})


def config_error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        settings(data)
    return info.value


def up(**item: Any) -> dict[str, Any]:
    return {"name": "up", "url": "http://127.0.0.1:5001", **item}


def upstream(**item: Any) -> UpstreamSettings:
    (one,) = settings({"upstreams": [up(**item)]}).upstreams
    return one


# --- defaults -------------------------------------------------------------------------------


def test_defaults_without_the_sections() -> None:
    loaded = settings({})

    assert loaded.auth == AuthSettings(
        htpasswd=None,
        token=TokenSettings(
            key=None, expiry=DEFAULT_TOKEN_EXPIRY, service=DEFAULT_TOKEN_SERVICE, realm=None
        ),
        trusted_proxies=(),
        decision_ttl=DEFAULT_DECISION_TTL,
        visibility_ttl=DEFAULT_VISIBILITY_TTL,
        probe_rate=Rate(DEFAULT_PROBE_RATE, 60.0),
    )
    assert loaded.access == AccessSettings(groups={}, admins=(), rules=DEFAULT_RULES)
    assert loaded.access.rules == (AccessRule(repos="**", pull=("anonymous", "passthrough")),)
    assert loaded.limits == LimitSettings(requests=None, cold_fetches=None, cold_bytes=None)


@pytest.mark.parametrize("empty", [None, {}])
def test_empty_sections_are_the_defaults(empty: dict[str, Any] | None) -> None:
    loaded = settings({"auth": empty, "access": empty, "limits": empty})

    assert loaded.auth == AuthSettings()
    assert loaded.access == AccessSettings()
    assert loaded.limits == LimitSettings()


def test_an_empty_token_section_is_the_default() -> None:
    assert settings({"auth": {"token": {}}}).auth.token == TokenSettings()


# --- every key -----------------------------------------------------------------------------------


def test_every_auth_key_is_read() -> None:
    auth = settings(FULL).auth

    assert auth.htpasswd == Path("/etc/registry-proxy/htpasswd")
    assert auth.token == TokenSettings(
        key=Path("/etc/registry-proxy/token.pem"),
        expiry=300.0,
        service="proxy.example",
        realm="https://proxy.example/token",
    )
    assert auth.trusted_proxies == ("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32")
    assert auth.decision_ttl == 90.0
    assert auth.visibility_ttl == 7200.0
    assert auth.probe_rate == Rate(30, 60.0)


def test_every_access_key_is_read() -> None:
    access = settings(FULL).access

    assert access.groups == {"ci": ("robot-ci", "robot-2"), "ops": ("carol",)}
    assert access.admins == ("ops",)
    assert access.rules == (
        AccessRule(repos="**", pull=("anonymous",)),
        AccessRule(repos="private/acme/**", pull=("alice", "group:ci", "passthrough")),
        AccessRule(repos="private/home/${user}/**", pull=("authenticated",)),
    )


def test_every_limits_key_is_read() -> None:
    limits = settings(FULL).limits

    assert limits.requests == Rate(50, 1.0)
    assert limits.cold_fetches == Rate(200, 6 * 3600.0)
    assert limits.cold_bytes == Rate(10 * 2**30, 6 * 3600.0)


@pytest.mark.parametrize(
    ("written", "rate"),
    [
        ("50/s", Rate(50, 1.0)),
        ("50 / 10s", Rate(50, 10.0)),
        ("3/500ms", Rate(3, 0.5)),
        ("1/1.5h", Rate(1, 5400.0)),
        ("7/d", Rate(7, 86400.0)),
    ],
)
def test_request_rates(written: str, rate: Rate) -> None:
    assert settings({"limits": {"requests": written}}).limits.requests == rate


def test_the_access_keys_of_an_upstream() -> None:
    one = upstream(visibility="private", passthrough=False, username="u", password="p")

    assert (one.visibility, one.passthrough) == ("private", False)
    assert one.effective_visibility == "private"
    assert not one.passthrough_enabled


@pytest.mark.parametrize(
    ("item", "visibility", "passthrough"),
    [
        ({}, "public", False),
        ({"username": "u", "password": "p"}, "auto", True),
        ({"username": "u", "password": "p", "visibility": "public"}, "public", True),
        ({"username": "u", "password": "p", "passthrough": False}, "auto", False),
        ({"visibility": "auto"}, "auto", False),
        ({"passthrough": True}, "public", True),
    ],
    ids=["anonymous", "credentials", "public", "no-passthrough", "auto", "passthrough"],
)
def test_visibility_and_passthrough_defaults(
    item: dict[str, Any], visibility: str, passthrough: bool
) -> None:
    one = upstream(**item)

    assert one.effective_visibility == visibility
    assert one.passthrough_enabled is passthrough


def test_the_builtin_upstream_is_public_without_passthrough() -> None:
    (hub,) = settings({}).upstreams

    assert (hub.visibility, hub.passthrough) == (None, None)
    assert hub.effective_visibility == "public"
    assert not hub.passthrough_enabled


# --- errors name the key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"auth": {"htpasswrd": "/x"}}, "auth.htpasswrd"),
        ({"auth": {"token": {"expiry": "5m", "ttl": 3}}}, "auth.token.ttl"),
        ({"access": {"rules": [{"repos": "**", "pul": ["anonymous"]}]}}, "access.rules[0].pul"),
        (
            {"access": {"rules": [{"repos": "**"}, {"repos": "x", "users": []}]}},
            "access.rules[1].users",
        ),
        ({"access": {"group": {}}}, "access.group"),
        ({"limits": {"request": "5/s"}}, "limits.request"),
    ],
)
def test_an_unknown_key_is_named(data: dict[str, Any], key: str) -> None:
    error = config_error(data)

    assert error.key == key
    assert error.message == "unknown key"
    assert str(error) == f"{key}: unknown key"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"auth": "yes"}, "auth"),
        ({"auth": {"token": "key.pem"}}, "auth.token"),
        ({"auth": {"htpasswd": 5}}, "auth.htpasswd"),
        ({"auth": {"htpasswd": ""}}, "auth.htpasswd"),
        ({"auth": {"token": {"expiry": "soon"}}}, "auth.token.expiry"),
        ({"auth": {"token": {"expiry": "-5s"}}}, "auth.token.expiry"),
        ({"auth": {"token": {"service": 5}}}, "auth.token.service"),
        ({"auth": {"token": {"realm": ["x"]}}}, "auth.token.realm"),
        ({"auth": {"trusted_proxies": "10.0.0.0/8"}}, "auth.trusted_proxies"),
        ({"auth": {"decision_ttl": "forever"}}, "auth.decision_ttl"),
        ({"auth": {"visibility_ttl": True}}, "auth.visibility_ttl"),
        ({"access": []}, "access"),
        ({"access": {"groups": ["ci"]}}, "access.groups"),
        ({"access": {"groups": {"ci": "robot-ci"}}}, "access.groups"),
        ({"access": {"admins": "ops"}}, "access.admins"),
        ({"access": {"rules": {"repos": "**"}}}, "access.rules"),
        ({"access": {"rules": ["**"]}}, "access.rules[0]"),
        ({"access": {"rules": [{"pull": ["anonymous"]}]}}, "access.rules[0].repos"),
        ({"access": {"rules": [{"repos": "**"}, {}]}}, "access.rules[1].repos"),
        ({"access": {"rules": [{"repos": None}]}}, "access.rules[0].repos"),
        ({"access": {"rules": [{"repos": ""}]}}, "access.rules[0].repos"),
        ({"access": {"rules": [{"repos": "**", "pull": "anonymous"}]}}, "access.rules[0].pull"),
        ({"access": {"rules": [{"repos": "**"}, {"repos": 5}]}}, "access.rules[1].repos"),
        ({"limits": {"requests": "50"}}, "limits.requests"),
        ({"limits": {"requests": "0/s"}}, "limits.requests"),
        ({"limits": {"requests": "1.5/s"}}, "limits.requests"),
        ({"limits": {"cold_fetches": "many/6h"}}, "limits.cold_fetches"),
        ({"limits": {"cold_bytes": "10 parsecs/6h"}}, "limits.cold_bytes"),
        ({"limits": {"cold_bytes": 10}}, "limits.cold_bytes"),
        ({"upstreams": [up(visibility="secret")]}, "upstreams[0].visibility"),
        ({"upstreams": [up(passthrough="yes")]}, "upstreams[0].passthrough"),
    ],
)
def test_a_bad_value_is_named(data: dict[str, Any], key: str) -> None:
    error = config_error(data)

    assert error.key == key
    assert str(error).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("proxies", "key"),
    [
        (["not-an-address"], "auth.trusted_proxies[0]"),
        (["10.0.0.0/8", "10.0.0.0/33"], "auth.trusted_proxies[1]"),
        (["10.0.0.0/8", 7], "auth.trusted_proxies[1]"),
    ],
)
def test_a_bad_trusted_proxy_is_named(proxies: list[object], key: str) -> None:
    error = config_error({"auth": {"trusted_proxies": proxies}})

    assert error.key == key


def test_trusted_proxies_are_normalised() -> None:
    auth = settings({"auth": {"trusted_proxies": ["10.1.2.3/8", "::1", "192.0.2.1"]}}).auth

    assert auth.trusted_proxies == ("10.0.0.0/8", "::1/128", "192.0.2.1/32")


# --- the round trip and what check-config shows ---------------------------------------------------


def full_config(tmp_path: Path) -> dict[str, Any]:
    return {
        **FULL,
        "cache": {"dir": str(tmp_path / "cache"), "redis": f"redis://:{REDIS_SECRET}@r:6379/0"},
        "upstreams": [
            up(
                name="private",
                username="ci",
                password=SECRET,
                visibility="auto",
                passthrough=True,
            ),
            up(name="hub", url="https://registry-1.docker.io", visibility="public"),
        ],
    }


def test_to_dict_shows_the_sections_as_the_file_writes_them(tmp_path: Path) -> None:
    shown = settings(full_config(tmp_path)).to_dict()

    assert shown["auth"] == {
        "htpasswd": "/etc/registry-proxy/htpasswd",
        "token": {
            "key": "/etc/registry-proxy/token.pem",
            "expiry": 300.0,
            "service": "proxy.example",
            "realm": "https://proxy.example/token",
        },
        "trusted_proxies": ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"],
        "decision_ttl": 90.0,
        "visibility_ttl": 7200.0,
        "probe_rate": "30/60s",
    }
    assert shown["access"] == {
        "groups": {"ci": ["robot-ci", "robot-2"], "ops": ["carol"]},
        "admins": ["ops"],
        "rules": [
            {"repos": "**", "pull": ["anonymous"]},
            {"repos": "private/acme/**", "pull": ["alice", "group:ci", "passthrough"]},
            {"repos": "private/home/${user}/**", "pull": ["authenticated"]},
        ],
    }
    assert shown["limits"] == {
        "requests": "50/1s",
        "cold_fetches": "200/21600s",
        "cold_bytes": "10737418240/21600s",
    }
    private, hub = shown["upstreams"]
    assert (private["visibility"], private["passthrough"]) == ("auto", True)
    assert hub["visibility"] == "public" and "passthrough" not in hub


def test_to_dict_round_trips(tmp_path: Path) -> None:
    data = full_config(tmp_path)
    first = settings(data)

    again = Settings.from_mapping(yaml.safe_load(yaml.safe_dump(first.to_dict())), environ={})

    assert again.auth == first.auth
    assert again.access == first.access
    assert again.limits == first.limits
    assert [(u.visibility, u.passthrough) for u in again.upstreams] == [
        (u.visibility, u.passthrough) for u in first.upstreams
    ]


def test_the_defaults_round_trip() -> None:
    first = settings({})

    again = settings(yaml.safe_load(yaml.safe_dump(first.to_dict())))

    assert (again.auth, again.access, again.limits) == (first.auth, first.access, first.limits)


@pytest.mark.parametrize(
    "written",
    ["200/30d", "1/12d", "7/1000000s", "3/500ms", "5/1.5h", "1/0.25s", "9/0.001s", "1/0.00001s"],
)
def test_every_rate_round_trips(written: str) -> None:
    period = written.partition("/")[2]
    first = settings({"limits": {"cold_fetches": written, "cold_bytes": f"1GiB/{period}"}})

    again = settings({"limits": first.to_dict()["limits"]})

    assert again.limits == first.limits


def test_check_config_prints_the_sections_and_no_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(full_config(tmp_path)), encoding="utf-8")

    assert main(["check-config", "--config", str(path)]) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert SECRET not in out
    assert REDIS_SECRET not in out
    printed = yaml.safe_load(out)
    assert printed["access"]["rules"][1]["pull"] == ["alice", "group:ci", "passthrough"]
    assert printed["limits"]["cold_fetches"] == "200/21600s"
    assert printed["auth"]["token"]["service"] == "proxy.example"
    assert printed["upstreams"][0]["password"] == "<redacted>"


def test_check_config_names_a_missing_pattern(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("access:\n  rules:\n    - {pull: [anonymous]}\n", encoding="utf-8")

    assert main(["check-config", "--config", str(path)]) == 2

    assert "access.rules[0].repos: expected a pattern" in capsys.readouterr().err


def test_check_config_names_a_bad_access_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("access:\n  rules:\n    - {repos: '**', pul: [anonymous]}\n", encoding="utf-8")

    assert main(["check-config", "--config", str(path)]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert "access.rules[0].pul: unknown key" in err


def test_the_repr_has_no_secret(tmp_path: Path) -> None:
    loaded = settings(full_config(tmp_path))

    assert SECRET not in repr(loaded)
    assert REDIS_SECRET not in repr(loaded)
