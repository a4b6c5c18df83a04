"""What the container engines of the rig (:mod:`.dockerd`, :mod:`.podman`) share: the image
they report after a pull, their error, and the environment that keeps them off public
registries.

Both engines fall back to the registry itself when a mirror fails (Docker to
``registry-1.docker.io``, podman to the ``[[registry]]`` location). The rig gives each one
``HTTP_PROXY``/``HTTPS_PROXY`` pointing at a loopback port nobody listens on, with
``NO_PROXY`` for loopback only: a request to anything but 127.0.0.1 fails at once
(``proxyconnect tcp: ... connection refused``), so a broken mirror fails the pull instead
of being bypassed, and no test ever reaches a public registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .process import Completed, free_port

# Loopback names that stay reachable with the dead proxy set.
LOOPBACK_NO_PROXY = "127.0.0.1,localhost,::1"


class EngineError(AssertionError):
    """An engine command failed; the message carries the command line, its exit code, the
    end of its stdout (a build's log) and stderr. An AssertionError, so a test fails (not
    errors) with it."""

    def __init__(self, result: Completed) -> None:
        ended = "timed out" if result.returncode is None else f"exited {result.returncode}"
        super().__init__(
            f"{result.command} {ended}\nstdout (end):\n{result.stdout[-3000:]}"
            f"\nstderr:\n{result.stderr[-4000:]}"
        )
        self.result = result


def checked(result: Completed) -> Completed:
    """``result`` if the command exited 0; else :class:`EngineError`."""
    if result.returncode != 0:
        raise EngineError(result)
    return result


def offline_proxy_environment() -> dict[str, str]:
    """``HTTP(S)_PROXY`` at a closed loopback port, ``NO_PROXY`` for loopback (both cases,
    as Go reads either)."""
    dead = f"http://127.0.0.1:{free_port()}"
    env: dict[str, str] = {}
    for name, value in (
        ("HTTP_PROXY", dead),
        ("HTTPS_PROXY", dead),
        ("NO_PROXY", LOOPBACK_NO_PROXY),
    ):
        env[name] = env[name.lower()] = value
    return env


def sha256_id(value: str) -> str:
    """``sha256:<hex>`` whether or not the engine printed the prefix."""
    return value if value.startswith("sha256:") else f"sha256:{value}"


@dataclass(frozen=True)
class PulledImage:
    """An image in an engine's local store, as the engine reports it.

    ``id`` is the image ID, which both engines make the config blob's digest;
    ``repo_digests`` are ``name@sha256:...``: the digest of the manifest (or index, or
    manifest list) the image was pulled by, as the registry served it.
    """

    reference: str
    id: str
    repo_digests: tuple[str, ...]
    size: int
    raw: dict[str, Any]

    @property
    def digests(self) -> set[str]:
        """The manifest digests of :attr:`repo_digests`."""
        return {d.rpartition("@")[2] for d in self.repo_digests}
