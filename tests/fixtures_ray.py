"""A real two-node Ray cluster on this machine, started once per test session.

`LocalRayCluster` runs ``ray start --head`` and ``ray start --address ...`` as child processes
with ``--block``, each in its own process group, with free ports and a private temp dir, and a
custom resource per node (``lg_head`` / ``lg_gen``) so tests can pin work to a node. Teardown
is scoped to these processes: SIGTERM to each ``ray start --block`` process (Ray then stops the
node's processes), then SIGKILL to anything left of the process trees it started. ``ray stop``
is never used: it stops every Ray process on the machine, other people's included.

Ray replaces a loopback ``--node-ip-address`` by the machine's own address (services.
resolve_ip_for_localhost), so the nodes report that address; the cluster still runs on this
machine only.

Fixtures: `ray_cluster` (this process a driver of it), `generator_actor` (the actor on the
``lg_gen`` node, holding the tiny trained checkpoint), `slow_generator_actor` (for one module, the
same actor holding `slow_generator_ckpt` instead: its generator passes take seconds, so calls are
observably in flight), `ray_servers` (two ``serve --ray-address`` servers, asking the slow actor);
`actor_health` and `wait_actor_healthy` ask the actor how it is, `start_session_actor` (re)starts it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures_serving import free_port

RAY_BIN = str(Path(sys.executable).with_name("ray"))
HEAD_RESOURCE = "lg_head"
GEN_RESOURCE = "lg_gen"  # the generator actor's node


class LocalRayCluster:
    """A head node and worker nodes of a real Ray cluster, as child processes of this one."""

    def __init__(self, root: Path, num_cpus: int = 2, object_store_mib: int = 128) -> None:
        self.root = root
        self.num_cpus = num_cpus
        self.object_store_mib = object_store_mib
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[tuple[str, subprocess.Popen]] = []  # (name, `ray start --block` process)
        self._relaunch: dict[str, tuple[Callable[[], list[str]], int]] = {}  # name -> (args, attempt)
        # Token auth off, explicitly: with RAY_AUTH_MODE unset, `ray start --head` turns it on
        # whenever ~/.ray/auth_token exists (any local `ray.init()` writes one), and drivers that
        # connect by address (unset = disabled) are then refused with InvalidAuthToken.
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0", RAY_AUTH_MODE="disabled")

    def _node_args(self, name: str, resources: dict[str, float]) -> list[str]:
        temp = self.root / name
        temp.mkdir(parents=True, exist_ok=True)
        p = free_port
        return [
            "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(self.num_cpus),
            "--num-gpus", "0",
            "--resources", json.dumps(resources),
            "--object-store-memory", str(self.object_store_mib * 2**20),
            "--temp-dir", str(temp),
            "--node-manager-port", str(p()),
            "--object-manager-port", str(p()),
            "--dashboard-agent-listen-port", str(p()),
            "--dashboard-agent-grpc-port", str(p()),
            "--metrics-export-port", str(p()),
            "--runtime-env-agent-port", str(p()),
            "--disable-usage-stats",
            "--block",
        ]  # fmt: skip

    def _launch(self, name: str, make_args: Callable[[], list[str]], attempt: int = 1) -> None:
        with open(self.root / f"{name}.log", "ab") as log:
            log.write(f"\n===== {name}: attempt {attempt}\n".encode())
            proc = subprocess.Popen(
                [RAY_BIN, "start", *make_args()], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
            )  # fmt: skip
        self.nodes = [n for n in self.nodes if n[0] != name] + [(name, proc)]
        self._relaunch[name] = (make_args, attempt)

    def start_head(self, resources: dict[str, float]) -> None:
        def args() -> list[str]:
            return ["--head", "--port", str(self.port), "--include-dashboard=false",
                    "--ray-client-server-port", str(free_port())] + self._node_args("head", resources)  # fmt: skip

        self._launch("head", args)

    def add_node(self, name: str, resources: dict[str, float]) -> None:
        self._launch(name, lambda: ["--address", self.address] + self._node_args(name, resources))

    def wait_for_head(self, timeout_s: float = 180.0) -> None:
        """Block until the head's GCS port accepts connections."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"Ray head at {self.address} did not come up in {timeout_s} s")

    def wait_for_nodes(self, n: int, timeout_s: float = 180.0) -> None:
        """Block until `n` nodes are alive (this process must be connected: ray.init)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if len([x for x in ray.nodes() if x["Alive"]]) >= n:
                return
            time.sleep(0.5)
        raise TimeoutError(f"Ray cluster at {self.address} did not reach {n} nodes in {timeout_s} s")

    def _check_alive(self, max_attempts: int = 3) -> None:
        """Start again a node whose `ray start` exited while starting (seen on an overloaded
        2-core machine: the raylet gives up waiting on the GCS); fail after `max_attempts`."""
        for name, proc in list(self.nodes):
            if proc.poll() is None:
                continue
            make_args, attempt = self._relaunch[name]
            log = (self.root / f"{name}.log").read_text(errors="replace")
            if attempt >= max_attempts:
                raise RuntimeError(
                    f"ray node {name} exited with {proc.returncode} ({attempt} attempts):\n{log[-4000:]}"
                )
            self._launch(name, make_args, attempt + 1)

    def node_id(self, resource: str) -> str:
        """The id of the (alive) node that offers `resource`."""
        import ray

        (node,) = [x for x in ray.nodes() if x["Alive"] and resource in x["Resources"]]
        return node["NodeID"]

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM each node's `ray start`, then SIGKILL what remains of the trees it started."""
        import psutil

        procs: list[psutil.Process] = []
        for _, node in self.nodes:
            try:
                root = psutil.Process(node.pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for _, node in reversed(self.nodes):  # workers first, the head last
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for _, node in self.nodes:
            node.wait(timeout=5)


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node Ray cluster (head: ``lg_head``; second node: ``lg_gen``); this process is a driver."""
    import ray

    from loragen_vllm.ray_actor import NAMESPACE

    # Short path: Ray's unix sockets live under the temp dir (107-byte path limit).
    root = Path(tempfile.mkdtemp(prefix="lgray-", dir="/tmp"))
    cluster = LocalRayCluster(root)
    started = False
    try:
        cluster.start_head({HEAD_RESOURCE: 1})
        cluster.wait_for_head()
        cluster.add_node("gen", {GEN_RESOURCE: 1})
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
        cluster.wait_for_nodes(2)
        started = True
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()
        if started:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"\nRay cluster did not start; its logs are in {root}")


def start_session_actor(checkpoint) -> dict:
    """Start the session's generator actor (named, on the ``lg_gen`` node, restarted by Ray when
    its process dies, in-flight calls re-sent) holding `checkpoint`; returns its health. Waits
    for the name of a stopped actor to be released first."""
    from loragen_vllm.ray_actor import ActorConfig, find_actor, start_actor

    deadline = time.monotonic() + 60
    while find_actor() is not None:  # a killed actor's name is released shortly after
        assert time.monotonic() < deadline, "the stopped generator actor's name was not released"
        time.sleep(0.2)
    _, health, created = start_actor(
        checkpoint,
        num_gpus=0,
        resources={GEN_RESOURCE: 1},
        config=ActorConfig(batch_window_s=0.02),
        max_task_retries=-1,
        ready_timeout_s=180,
    )
    assert created
    return health


@pytest.fixture(scope="session")
def generator_actor(ray_cluster, tiny_generator_ckpt):
    """The generator actor on the ``lg_gen`` node, holding the tiny checkpoint; returns its health."""
    return start_session_actor(tiny_generator_ckpt)


SLOW_STEPS = 300  # DiT steps per pass of `slow_generator_ckpt` (~2 s for one description on one core)


@pytest.fixture(scope="session")
def slow_generator_ckpt(tmp_path_factory):
    """The shipped checkpoint sampling with SLOW_STEPS DiT steps instead of its 20 (a checkpoint of
    its own: another fingerprint). The tiny generator's pass is over in tens of milliseconds, too
    soon to tell calls that overlapped in the actor from calls that came one after the other, or
    to kill the actor while a call is inside its pass."""
    from generator import Generator
    from loragen_vllm.defaults import default_generator_checkpoint

    shipped = Generator.load(default_generator_checkpoint())
    slow = Generator(shipped.kind, shipped.target, shipped.model, shipped.configs,
                     {**shipped.sampler, "steps": SLOW_STEPS}, extra=shipped.extra)  # fmt: skip
    return slow.save(tmp_path_factory.mktemp("slow_generator"))


@pytest.fixture(scope="module")
def slow_generator_actor(ray_cluster, generator_actor, slow_generator_ckpt, tiny_generator_ckpt):
    """For one module: the session's actor replaced by one holding `slow_generator_ckpt` (same
    name, node and options); returns its health. The tiny one is running again afterwards."""
    from loragen_vllm.ray_actor import stop_actor

    stop_actor()
    try:
        yield start_session_actor(slow_generator_ckpt)
    finally:
        stop_actor()
        start_session_actor(tiny_generator_ckpt)


@pytest.fixture(scope="module")
def ray_servers(ray_cluster, slow_generator_actor, slow_generator_ckpt, tmp_path_factory):
    """Two ``loragen-vllm serve --ray-address`` servers with separate stores (as on two nodes),
    asking `slow_generator_actor` (their ``--generator`` is its checkpoint: the fingerprint is
    known up front).

    Module-scoped: only tests/test_ray_backend.py uses them, and they (~2-3 GiB each) are gone before
    other modules start their own server. Started in parallel (each start is ~30-60 s).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tests.fixtures_serving import ServerProcess

    root = tmp_path_factory.mktemp("ray-serving")
    servers = [
        ServerProcess(
            slow_generator_ckpt, root / f"store{i}", root / f"server{i}.log",
            serve_args=("--ray-address", ray_cluster.address),
        )
        for i in range(2)
    ]
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(ServerProcess.start, servers))
        yield servers
    finally:
        for server in servers:
            server.stop()
            print(f"\nvLLM server log: {server.log_path}")


# ----------------------------------------------------------------------------------------------
# Asking the session's generator actor


def actor_health(timeout_s: float = 120) -> dict:
    """The running generator actor's `health()` (this process must be connected: `ray_cluster`)."""
    import ray

    from loragen_vllm.ray_actor import find_actor

    return ray.get(find_actor().health.remote(), timeout=timeout_s)


def wait_actor_healthy(timeout_s: float = 180.0) -> dict:
    """Health of the (re)started actor, waiting through a restart."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return actor_health()
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, AttributeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
