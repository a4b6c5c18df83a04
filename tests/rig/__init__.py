"""The test rig: real servers and fakes on loopback, shared by ``tests/integration`` and
``bench`` (``from tests.rig.registry import Registry``; run both from the repository root).

- ``process``: free ports, child processes started with a readiness deadline and stopped
  by PID, log tails, commands run to completion (:func:`process.run_command`).
- ``registry``: docker-registry (plain, with an ``auth:`` section, or as a pull-through
  peer); ``redis_server``: redis-server; ``containerd``: containerd and ``ctr``;
  ``prometheus``: Prometheus and its query API.
- ``skopeo``: skopeo copy (push and pull) in a hermetic environment.
- ``dockerd``: a private Docker daemon and the ``docker`` CLI (mirrors, pull and inspect,
  import, classic builds); ``podman``: podman with private storage, pulling through a
  ``registries.conf`` mirror, ``login`` to an auth file; ``engine``: what both report
  (:class:`~.engine.PulledImage`) and the dead HTTP proxy that keeps them off public
  registries; ``base_image``: the mmdebstrap-made base of the container image.
- ``oci``: media types, config/manifest documents, generated OCI layouts;
  ``distribution``: a distribution-API client (blob and manifest push and fetch, streamed
  uploads, raw requests, seeding an upstream).
- ``recording``: loopback aiohttp servers that record every request, and the counting
  pass-through; ``faults``: the fault-injecting pass-through; ``upstreams``: a lying
  upstream, a blob store, a redirecting upstream.
- ``auth``: htpasswd and the token server (needs the ``test`` extra).
- ``proxy_app``: the proxy under test served in the caller's loop; ``world``: three
  upstreams (anonymous, Basic, token) behind one proxy.

Nothing here is a pytest fixture: fixtures live in ``tests/integration/conftest.py``.
"""
