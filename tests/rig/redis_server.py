"""Debian's ``redis-server`` as a child process on a free loopback port.

No persistence (``--save "" --appendonly no``), its own ``--dir``. ``stop()`` then
``start()`` brings it back, empty, on the same port; ``kill()`` is SIGKILL (a crash);
``pause()``/``resume()`` are SIGSTOP/SIGCONT (a hung server: the kernel accepts
connections, nothing is answered). Ready means it answers an inline PING.

:class:`RedisSentinel` is ``redis-server --sentinel`` watching one master.
:class:`RedisClusterNodes` is a Redis Cluster of N masters (no replicas), each a
:class:`RedisClusterNode` (``--cluster-enabled yes``), formed with
``redis-cli --cluster create`` and ready when every node says ``cluster_state:ok``.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Self

import redis
import redis.asyncio as aioredis

from .process import STOP_TIMEOUT, ChildProcess, NotReady, free_port, wait_until

REDIS_BINARY = "/usr/bin/redis-server"
REDIS_CLI_BINARY = "/usr/bin/redis-cli"
CLUSTER_NODE_TIMEOUT_MS = 1000


class RedisServer(ChildProcess):
    """``redis-server`` on a fixed loopback port, stopped by PID."""

    name = "redis-server"
    start_timeout = 10.0

    def __init__(
        self, workdir: Path, *, binary: str = REDIS_BINARY, replica_of: int | None = None
    ) -> None:
        super().__init__(workdir, log_name="redis.log")
        self.binary = binary
        self.port = free_port()
        self.paused = False
        self.replica_of = replica_of

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            *(["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []),
        ]

    def start(self, timeout: float | None = None) -> None:
        if not self.running:
            self.paused = False
        super().start(timeout)

    def ready(self) -> bool:
        return self.ping()

    def ping(self, timeout: float = 0.5) -> bool:
        """One inline PING over a fresh connection; True on ``+PONG``."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL by PID (a crash) and reap it; the port is free again afterwards."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(STOP_TIMEOUT)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the server hangs (the kernel still accepts connections)."""
        assert self.process is not None and self.running, "redis-server is not running"
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.process is not None and self.paused:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM by PID (after SIGCONT if paused), SIGKILL if it lingers; idempotent."""
        self.resume()
        super().stop(timeout)

    def log_tail(self, lines: int = 30) -> str:
        return super().log_tail(lines)


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client for inspecting what the proxy wrote (not the proxy's own client)."""
    client = aioredis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        yield client
    finally:
        await client.aclose()


class RedisSentinel(RedisServer):
    """``redis-server --sentinel`` watching the master on ``master_port`` as ``service``,
    alone (quorum 1) and quick to act (down after ``down_after_ms``)."""

    name = "redis-sentinel"

    def __init__(
        self,
        workdir: Path,
        master_port: int,
        *,
        service: str = "mymaster",
        down_after_ms: int = 500,
        binary: str = REDIS_BINARY,
    ) -> None:
        super().__init__(workdir, binary=binary)
        self.log_path = workdir / "sentinel.log"
        self.service = service
        self.master_port = master_port
        self.down_after_ms = down_after_ms

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def argv(self) -> list[str]:
        # Sentinel rewrites its configuration file: one of its own, in the work dir.
        config = self.workdir / "sentinel.conf"
        config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} 3000\n"
        )
        return [self.binary, str(config), "--sentinel"]

    def command(self, *args: str, timeout: float = 1.0) -> bytes:
        """One inline command over a fresh connection; the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(" ".join(args).encode() + b"\r\n")
            return sock.recv(4096)

    def master_port_now(self) -> int | None:
        """The port of the master the sentinel names now (None if it cannot say)."""
        try:
            reply = self.command("SENTINEL", "get-master-addr-by-name", self.service)
        except OSError:
            return None
        lines = reply.split(b"\r\n")
        return int(lines[4]) if len(lines) > 4 and lines[4].isdigit() else None

    def knows_replicas(self) -> bool:
        try:
            reply = self.command("SENTINEL", "replicas", self.service)
        except OSError:
            return False
        return not reply.startswith(b"*0") and reply.startswith(b"*")


class RedisClusterNode(RedisServer):
    """One master of a Redis Cluster; its ``nodes.conf`` (its identity and slots) is kept
    in its work dir, so a node stopped or killed and started again rejoins as itself.
    Its cluster bus gets a free port of its own (by default it would be the port plus
    10000, which may be taken, or past 65535)."""

    name = "redis-cluster-node"

    def __init__(self, workdir: Path, *, binary: str = REDIS_BINARY, node_timeout_ms: int) -> None:
        super().__init__(workdir, binary=binary)
        self.node_timeout_ms = node_timeout_ms
        self.bus_port = free_port()

    def argv(self) -> list[str]:
        return [
            *super().argv(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.workdir / "nodes.conf"),
            "--cluster-port",
            str(self.bus_port),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
        ]

    def cluster_info(self) -> dict[str, str]:
        """``CLUSTER INFO`` as a mapping ({} when the node does not answer)."""
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            info = client.execute_command("CLUSTER INFO")
        except (redis.RedisError, OSError):
            return {}
        finally:
            client.close()
        return {str(k): str(v) for k, v in info.items()}

    def dbsize(self) -> int:
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return int(client.dbsize())
        finally:
            client.close()


class RedisClusterNodes:
    """``count`` masters on free loopback ports forming one cluster (every slot served,
    no replicas: a node killed leaves its slots unserved, and after ``node_timeout_ms``
    the cluster refuses every command until it is back). Stopped by PID."""

    def __init__(
        self,
        workdir: Path,
        count: int = 3,
        *,
        binary: str = REDIS_BINARY,
        cli: str = REDIS_CLI_BINARY,
        node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS,
    ) -> None:
        self.cli = cli
        self.nodes = [
            RedisClusterNode(workdir / f"node-{i}", binary=binary, node_timeout_ms=node_timeout_ms)
            for i in range(count)
        ]
        for i, node in enumerate(self.nodes):
            node.name = f"redis-cluster-node-{i}"

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __iter__(self) -> Iterator[RedisClusterNode]:
        return iter(self.nodes)

    def __getitem__(self, index: int) -> RedisClusterNode:
        return self.nodes[index]

    @property
    def url(self) -> str:
        """Every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes) + "/"

    def start(self) -> None:
        taken: set[int] = set()
        for node in self.nodes:
            self._start_node(node, taken)
        argv = [
            self.cli,
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in self.nodes),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise NotReady(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
        self.wait_ok()

    @staticmethod
    def _start_node(node: RedisClusterNode, taken: set[int], attempts: int = 3) -> None:
        """Start a node on ports no other node has; new ones if they were taken meanwhile
        (a free port is only free until someone binds it; a node needs two)."""
        for attempt in range(attempts):
            while {node.port, node.bus_port} & taken or node.port == node.bus_port:
                node.port, node.bus_port = free_port(), free_port()
            try:
                node.start()
            except NotReady:
                if attempt + 1 == attempts or "Address already in use" not in node.log_tail():
                    raise
                taken |= {node.port, node.bus_port}  # not ours to use: pick others
                continue
            taken |= {node.port, node.bus_port}
            return

    def ok(self) -> bool:
        """Every node running and saying ``cluster_state:ok``, with every slot assigned."""
        for node in self.nodes:
            if not node.running:
                return False
            info = node.cluster_info()
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
        return True

    def wait_ok(self, within: float = 30.0) -> None:
        wait_until(self.ok, within=within, what="the redis cluster to be ok", interval=0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
