"""The README's configuration example is a configuration the proxy accepts, key for key."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from proxy.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def configuration_example() -> dict[str, object]:
    text = README.read_text()
    section = text[text.index("## Configuration") :]
    match = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert match, "no yaml block under ## Configuration"
    data = yaml.safe_load(match.group(1))
    assert isinstance(data, dict)
    return data


def test_the_readme_configuration_is_accepted() -> None:
    settings = Settings.from_mapping(configuration_example(), environ={"DOCKERHUB_TOKEN": "x"})
    assert settings.auth.htpasswd == Path("/etc/registry-proxy/htpasswd")
    assert settings.auth.token.expiry == 300
    assert settings.auth.trusted_proxies == ("10.0.0.0/8",)
    assert settings.access.groups == {"ci": ("robot-ci",)}
    assert [rule.repos for rule in settings.access.rules][-1] == "dockerhub/users/${user}/**"
    assert settings.limits.requests is not None and settings.limits.requests.amount == 50
    assert settings.limits.cold_fetches is not None
    assert settings.limits.cold_fetches.period == 6 * 3600
    (upstream,) = settings.upstreams
    assert upstream.effective_visibility == "auto"
    assert upstream.passthrough_enabled


def test_the_readme_configuration_sets_the_cluster_up() -> None:
    settings = Settings.from_mapping(configuration_example(), environ={"DOCKERHUB_TOKEN": "x"})
    assert settings.cluster.enabled
    assert settings.cluster.advertise == "http://10.0.0.5:5000"
    assert settings.cluster.lease_ttl == 10
    assert settings.shutdown_grace == 25
