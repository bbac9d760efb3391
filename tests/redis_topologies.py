"""Real Redis topologies for tests, made of local ``redis-server`` processes.

* ``RedisClusterTopology``: three masters with one replica each, slots split in three, formed
  without ``redis-cli`` (``CLUSTER ADDSLOTS``, ``MEET``, ``REPLICATE``).
* ``RedisSentinelTopology``: one master, two replicas, three sentinels (quorum 2).

Timeouts are short so that a failover takes seconds: a cluster node is failed after 1 s
without an answer, a sentinel calls a master down after 1 s. Every wait is a poll against a
deadline, never a fixed sleep.

Works alike on Redis 6.2 (the bundled binary), 7.x and Valkey: every server that may become a
master gets ``REPLICATION_ARGS``, and "healthy" means every replica has finished its first sync
(``state=online``), not merely connected.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from proxy.store.embedded_redis import EmbeddedRedis, free_port

HOST = "127.0.0.1"
NODE_TIMEOUT_MS = 1000
SERVICE = "llmproxy"
REPLICATION_ARGS = ("--repl-diskless-sync-delay", "0")
"""Redis 7 defaults to diskless sync with a 5 s delay (to gather replicas for one transfer):
a freshly attached replica then has nothing for 5 s and ``WAIT`` answers 0, so a
``durability = "replicated"`` proxy refuses everything meanwhile. 6.2 syncs at once by default
(disk-based); the option exists in both."""


def poll(check: Callable[[], Any], within: float, what: str, every: float = 0.05) -> Any:
    """Calls ``check`` until it returns something truthy, or fails naming ``what``."""
    deadline = time.monotonic() + within
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except redis.RedisError as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last error: {last_error})")
        time.sleep(every)


def client(node: EmbeddedRedis, **kwargs: Any) -> redis.Redis:
    return redis.Redis(host=HOST, port=node.port, socket_timeout=2, decode_responses=True, **kwargs)


def command(node: EmbeddedRedis, *args: Any) -> Any:
    with client(node) as c:
        return c.execute_command(*args)


def replicas_in_sync(master: EmbeddedRedis) -> int:
    """Replicas that finished their first sync and stream writes: ``state=online`` on the
    master (a connected one may still wait for its snapshot: ``wait_bgsave``, ``send_bulk``)
    and ``master_link_status:up`` on the replica (Valkey 9 marks a replica online once the
    snapshot is sent, about a second before the replica has loaded it and acknowledges)."""
    info = client(master).info("replication")
    count = int(info.get("connected_slaves", 0))
    replicas = [info.get(f"slave{i}", {}) for i in range(count)]
    return sum(
        1
        for replica in replicas
        if replica.get("state") == "online" and _link_up(int(replica.get("port", 0)))
    )


def _link_up(port: int) -> bool:
    with redis.Redis(host=HOST, port=port, socket_timeout=2, decode_responses=True) as c:
        return bool(c.info("replication").get("master_link_status") == "up")


def wait_in_sync(master: EmbeddedRedis, replicas: int, within: float = 15) -> None:
    poll(lambda: replicas_in_sync(master) >= replicas, within, f"{replicas} replica(s) in sync")


def pause(node: EmbeddedRedis) -> None:
    """SIGSTOP: the server stops answering, like a replica that fell behind."""
    assert node.pid is not None
    os.kill(node.pid, signal.SIGSTOP)


def resume(node: EmbeddedRedis) -> None:
    if node.pid is not None:
        os.kill(node.pid, signal.SIGCONT)


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too: at most 55535."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind((HOST, port + 10000))
            except OSError:
                continue
        return port


class RedisClusterTopology:
    """Three shards, each a master with one replica."""

    SHARDS = 3

    def __init__(self, base: Path) -> None:
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # Any replica may take over, however long it was cut off (tests pause replicas).
            "--cluster-replica-validity-factor", "0",
            # Shards whose master is up keep serving while another shard fails over (the
            # default stops the whole cluster until every slot has a live master again).
            "--cluster-require-full-coverage", "no",
            *REPLICATION_ARGS,
        ]  # fmt: skip
        self.nodes = [
            EmbeddedRedis(base / f"node{i}", cluster_port(), persist=False, extra_args=args)
            for i in range(2 * self.SHARDS)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes[:3])

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        masters, replicas = self.nodes[: self.SHARDS], self.nodes[self.SHARDS :]
        per = 16384 // self.SHARDS
        for index, master in enumerate(masters):
            last = 16383 if index == self.SHARDS - 1 else (index + 1) * per - 1
            command(master, "CLUSTER", "ADDSLOTS", *range(index * per, last + 1))
        for node in self.nodes[1:]:
            command(self.nodes[0], "CLUSTER", "MEET", HOST, node.port)
        poll(self._all_known, 10, "every node to know every other")
        for replica, master in zip(replicas, masters, strict=True):
            master_id = command(master, "CLUSTER", "MYID")
            poll(
                functools.partial(command, replica, "CLUSTER", "REPLICATE", master_id),
                10,
                "a replica to attach",
            )
        self.wait_healthy()

    def _all_known(self) -> bool:
        for node in self.nodes:
            lines = command(node, "CLUSTER", "NODES").strip().splitlines()
            if len(lines) != len(self.nodes) or any("handshake" in line for line in lines):
                return False
        return True

    def wait_healthy(self, within: float = 20) -> None:
        """Every live node says the cluster is ok and every shard has a linked replica."""

        def healthy() -> bool:
            for node in self.live():
                if "cluster_state:ok" not in command(node, "CLUSTER", "INFO"):
                    return False
            return all(replicas_in_sync(master) >= 1 for master in self.masters())

        poll(healthy, within, "a healthy cluster")

    def live(self) -> list[EmbeddedRedis]:
        return [node for node in self.nodes if node.running]

    def masters(self) -> list[EmbeddedRedis]:
        ports = {int(entry[2][1]) for entry in self._slots()}
        return [node for node in self.live() if node.port in ports]

    def _slots(self) -> list[Any]:
        for node in self.live():
            with contextlib.suppress(redis.RedisError):
                slots: list[Any] = command(node, "CLUSTER", "SLOTS")
                return slots
        raise AssertionError("no cluster node answers")

    def shards(self) -> list[tuple[EmbeddedRedis, EmbeddedRedis]]:
        """(master, replica) of each shard, in the order of their slot ranges. Redis 7 leaves a
        replica out of ``CLUSTER SLOTS`` until its first sync is done: waited for."""
        by_port = {node.port: node for node in self.nodes}

        def with_replicas() -> list[Any] | None:
            slots = sorted(self._slots(), key=lambda e: int(e[0]))
            return slots if all(len(entry) > 3 for entry in slots) else None

        slots: list[Any] = poll(with_replicas, 15, "a replica listed for every shard")
        return [(by_port[int(entry[2][1])], by_port[int(entry[3][1])]) for entry in slots]

    def master_of(self, key: str) -> EmbeddedRedis:
        slot = key_slot(key.encode())
        for start, end, master, *_ in self._slots():
            if start <= slot <= end:
                for node in self.live():
                    if node.port == int(master[1]):
                        return node
        raise AssertionError(f"no live master for slot {slot}")

    def replica_of(self, master: EmbeddedRedis) -> EmbeddedRedis:
        master_id = command(master, "CLUSTER", "MYID")
        for line in command(master, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if fields[3] == master_id and "fail" not in fields[2]:
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                return next(n for n in self.nodes if n.port == port)
        raise AssertionError("the master has no replica")

    def wait_master_changed(self, key: str, old: EmbeddedRedis, within: float = 20) -> float:
        """Polls until another node serves ``key``'s slot; returns when it did (monotonic)."""

        def moved() -> bool:
            try:
                return self.master_of(key) is not old
            except AssertionError:
                return False

        poll(moved, within, "a replica to take over")
        return time.monotonic()

    def flushall(self) -> None:
        for master in self.masters():
            command(master, "FLUSHALL")

    def stop(self) -> None:
        for node in self.nodes:
            resume(node)
            node.stop()


class RedisSentinelTopology:
    """A master, two replicas, three sentinels watching it as ``SERVICE`` (quorum 2)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.servers = [
            EmbeddedRedis(base / "master", persist=False, extra_args=REPLICATION_ARGS)
        ]
        self.sentinels: list[EmbeddedRedis] = []

    @property
    def url(self) -> str:
        sentinels = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{sentinels}/{SERVICE}"

    def start(self) -> None:
        master = self.servers[0]
        master.start()
        for index in (1, 2):
            replica = EmbeddedRedis(
                self.base / f"replica{index}",
                persist=False,
                extra_args=[*REPLICATION_ARGS, "--replicaof", HOST, str(master.port)],
            )
            replica.start()
            self.servers.append(replica)
        wait_in_sync(master, 2)
        for index in range(3):
            directory = self.base / f"sentinel{index}"
            directory.mkdir(parents=True, exist_ok=True)
            config = directory / "sentinel.conf"
            config.write_text(
                "\n".join(
                    [
                        f"sentinel monitor {SERVICE} {HOST} {master.port} 2",
                        f"sentinel down-after-milliseconds {SERVICE} {NODE_TIMEOUT_MS}",
                        f"sentinel failover-timeout {SERVICE} 3000",
                        f"sentinel parallel-syncs {SERVICE} 2",
                        "",
                    ]
                )
            )
            sentinel = EmbeddedRedis(
                directory, persist=False, config_file=config, extra_args=["--sentinel"]
            )
            sentinel.start()
            self.sentinels.append(sentinel)
        self.wait_healthy()

    def master_address(self) -> tuple[str, int]:
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            with contextlib.suppress(redis.RedisError):
                host, port = command(sentinel, "SENTINEL", "get-master-addr-by-name", SERVICE)
                return host, int(port)
        raise AssertionError("no sentinel answers")

    def master(self) -> EmbeddedRedis:
        port = self.master_address()[1]
        return next(s for s in self.servers if s.port == port)

    def replicas(self) -> list[EmbeddedRedis]:
        master = self.master()
        return [s for s in self.servers if s is not master and s.running]

    def wait_healthy(self, within: float = 30) -> None:
        """Every sentinel knows the master, both replicas and the two other sentinels."""

        def healthy() -> bool:
            master = self.master()
            for sentinel in self.sentinels:
                state = client(sentinel).sentinel_master(SERVICE)
                if (
                    int(state["port"]) != master.port
                    or state["num-slaves"] < 2
                    or state["num-other-sentinels"] < 2
                    or state["flags"] != "master"
                ):
                    return False
            return replicas_in_sync(master) >= 2

        poll(healthy, within, "sentinels watching a master with two replicas")

    def wait_master_changed(self, old: EmbeddedRedis, within: float = 30) -> float:
        poll(lambda: self.master_address()[1] != old.port, within, "the sentinels' failover")
        return time.monotonic()

    def flushall(self) -> None:
        command(self.master(), "FLUSHALL")

    def stop(self) -> None:
        for node in [*self.sentinels, *self.servers]:
            resume(node)
            node.stop()


@contextlib.contextmanager
def running(topology: RedisClusterTopology | RedisSentinelTopology) -> Iterator[Any]:
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()
