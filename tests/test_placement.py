"""Where rank groups land, on a simulated cluster (`ray.cluster_utils.Cluster`): a CPU head with no GPUs and two
worker nodes declaring 2 GPUs each, ranks running on CPU. A group's ranks share one node; two groups fill both
nodes; a third cannot be placed (PlacementTimeout, nothing leaked) until a node joins. Through Ray Serve, a
replica declared with `rank_bundles` starts its ranks inside its own placement group, on its own node; with the
whole app, a parallel replica that cannot be placed stays pending and its jobs stay queued until a node frees; and
the production shape (PostgreSQL, S3, no shared disk, stages spread over both nodes) with a denoiser pool that
scales from zero and back."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest
import ray
import ray._common.utils
import ray._private.utils
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.placement_group import get_current_placement_group
from serve_helpers import wait_until

from imagine.serving.ranks import PlacementTimeout, RankGroup, rank_bundles

pytestmark = pytest.mark.ray

GPUS_PER_NODE = 2
NODE_CPUS = 2
RANK_CPUS = 0.5
REPLICA_CPUS = 0.25


class Probe:
    """A rank object with nothing to compute: placement is what these tests look at."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def probe(rank: int, world_size: int) -> Probe:
    return Probe(rank, world_size)


def new_group(placement_timeout_s: float = 60.0) -> RankGroup:
    return RankGroup(
        2, probe, "cpu", cpus_per_rank=RANK_CPUS, declare_gpus=True, placement_timeout_s=placement_timeout_s
    )


def live_placement_groups() -> dict[str, str]:
    """Placement groups that hold or wait for resources: id -> state."""
    table = ray.util.placement_group_table()
    return {pg_id: pg["state"] for pg_id, pg in table.items() if pg["state"] in ("PENDING", "CREATED", "RESCHEDULING")}


def gpu_node_ids() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0}


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, str]]:
    # a multi-node cluster of its own: the session's single-node Ray (if a module before started it) goes first; the
    # next module that needs it starts it again (conftest `ray_session`)
    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="rp", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    with pytest.MonkeyPatch.context() as patch:
        # Cluster records its address in the machine-wide /tmp/ray/ray_current_cluster (whatever the temp dir)
        # and deletes that file on shutdown; a plain `ray.init()` anywhere on the machine would then join this
        # cluster. Keep it private: other Ray users share this machine.
        patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        patch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
        c = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "num_gpus": 0, "temp_dir": temp_dir, "include_dashboard": False},
        )
        try:
            for _ in range(2):
                c.add_node(num_cpus=NODE_CPUS, num_gpus=GPUS_PER_NODE, temp_dir=temp_dir)
            tests_dir = os.path.dirname(os.path.abspath(__file__))  # workers import the rank objects from here
            # fake AWS credentials for the loopback S3 server (moto accepts any): the nodes started before the
            # `s3_server` fixture put them in this process's environment, so the job's workers get them here
            fake_aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
            ray.init(address=c.address, logging_level="ERROR",
                     runtime_env={"env_vars": {"PYTHONPATH": tests_dir, **fake_aws}})
            yield c, temp_dir
        finally:
            ray.shutdown()
            c.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_group_ranks_share_one_gpu_node(cluster: tuple[Cluster, str]) -> None:
    with new_group() as g:
        (node,) = set(g.node_ids())
        assert node in gpu_node_ids()
        assert sorted(i.gpu_ids for i in g.info) == [("0",), ("1",)]  # one declared GPU each, not the same one
        assert g.call_all("node_id") == [node, node]
    wait_until(lambda: not live_placement_groups(), 30, "placement group removed")


@pytest.fixture()  # per test: later tests need both GPU nodes free again
def two_groups(cluster: tuple[Cluster, str]) -> Iterator[list[RankGroup]]:
    groups = [new_group(), new_group()]
    try:
        for g in groups:
            g.start()
        yield groups
    finally:
        for g in groups:
            g.shutdown()


def test_two_groups_use_both_gpu_nodes(two_groups: list[RankGroup]) -> None:
    nodes = [set(g.node_ids()) for g in two_groups]
    assert all(len(n) == 1 for n in nodes), nodes
    assert nodes[0] | nodes[1] == gpu_node_ids() and nodes[0] != nodes[1]


def test_third_group_waits_for_a_node(cluster: tuple[Cluster, str], two_groups: list[RankGroup]) -> None:
    c, temp_dir = cluster
    before = live_placement_groups()
    g = new_group(placement_timeout_s=3.0)
    started = time.monotonic()
    with pytest.raises(PlacementTimeout, match="could not place 2 ranks"):
        g.start()
    assert time.monotonic() - started < 20
    assert live_placement_groups() == before  # its pending placement group was removed
    assert g.placement_group is None and not g.healthy

    node = c.add_node(num_cpus=NODE_CPUS, num_gpus=GPUS_PER_NODE, temp_dir=temp_dir)
    try:
        g.placement_timeout_s = 60.0
        g.start()  # the same group, retried once the cluster grew
        assert set(g.node_ids()) == {node.node_id}
        assert g.call("node_id") == node.node_id
    finally:
        g.shutdown()
        c.remove_node(node)
        wait_until(lambda: node.node_id not in gpu_node_ids(), 60, "added node gone")


class RankedReplica:
    """A Serve replica that owns a 2-rank group: its ranks must run in the replica's own placement group."""

    def __init__(self) -> None:
        self.group = new_group(placement_timeout_s=30.0)
        self.group.start()

    def where(self) -> dict:
        pg = get_current_placement_group()
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "replica_node": ray.get_runtime_context().get_node_id(),
            "rank_nodes": self.group.node_ids(),
            "in_replica_pg": pg is not None and self.group.placement_group.id == pg.id,
        }


def ranked_app(num_replicas: int) -> serve.Application:
    deployment = serve.deployment(
        RankedReplica,
        name="ranked",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": REPLICA_CPUS},
        placement_group_bundles=rank_bundles(2, "cpu", RANK_CPUS, REPLICA_CPUS, declare_gpus=True),
        placement_group_strategy="STRICT_PACK",
    )
    return deployment.bind()


def _name(state: object) -> str:
    """Serve's status enums arrive as members or as plain strings, depending on the path."""
    return str(getattr(state, "value", state))


def test_serve_replicas_hold_their_ranks(cluster: tuple[Cluster, str]) -> None:
    serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy, no port to clash
    try:
        handle = serve.run(ranked_app(2), name="ranks", route_prefix=None)
        seen: dict[str, dict] = {}
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:  # requests are routed at random: ask until both answer
            where = handle.where.remote().result(timeout_s=30)
            seen[where["replica"]] = where
        assert len(seen) == 2, seen
        for where in seen.values():
            assert where["in_replica_pg"], where
            assert set(where["rank_nodes"]) == {where["replica_node"]}, where  # STRICT_PACK: replica + ranks
        assert {w["replica_node"] for w in seen.values()} == gpu_node_ids()

        # a replica that cannot be placed stays pending (and its pool's jobs queued) until a node frees up:
        # test_jobs_wait_queued_for_an_unplaced_parallel_replica, with the whole app
    finally:
        serve.shutdown()
    wait_until(lambda: not live_placement_groups(), 60, "Serve's placement groups removed")


def test_jobs_wait_queued_for_an_unplaced_parallel_replica(cluster: tuple[Cluster, str], tmp_path) -> None:
    """The whole app with a 2-rank (declared-GPU) denoiser while other work holds every GPU: the replica stays
    pending and a submitted job stays queued, not failed; once a node frees up, the replica is placed and the job
    runs to done."""
    import httpx
    from serve_helpers import SMALL, Served, free_port, small_config

    from imagine.models.tiny import ensure_tiny_ltx2
    from imagine.serving.app import build_app

    home = tmp_path / "home"
    ensure_tiny_ltx2(home)
    blockers = [new_group(), new_group()]
    for g in blockers:
        g.start()  # each holds both GPUs of one node
    config = small_config(
        home,
        stage_cpus=0.05,
        ingress={"num_cpus": 0.05, "max_ongoing_requests": 1},
        denoiser={"num_gpus": 1, "parallel": {"sequence": 2, "cpus_per_rank": RANK_CPUS}},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    served = Served(config, port)
    try:
        serve.run_many(
            [serve.RunTarget(build_app(config), name="imagine", route_prefix="/")], wait_for_applications_running=False
        )

        def ingress_up() -> bool:
            try:
                return served.http.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ingress_up, 120, "ingress answering")
        job_id = served.submit(**SMALL)
        observed_s = 6
        observed_until = time.monotonic() + observed_s  # the replica cannot be placed: the job must wait, not fail
        while time.monotonic() < observed_until:
            job = served.job(job_id)
            assert job["state"] == "queued" and job["started_at"] is None, job
            time.sleep(0.5)
        denoiser = serve.status().applications["imagine"].deployments["Denoiser"].replica_states
        assert {_name(k): v for k, v in denoiser.items()} == {"STARTING": 1}, denoiser

        blockers.pop().shutdown()  # a node's GPUs free up
        job = served.wait_terminal(job_id, timeout=240)
        assert job["status"] == "done", job
        assert job["started_at"] > job["created_at"] + observed_s
    finally:
        served.http.close()
        for g in blockers:
            g.shutdown()
        serve.shutdown()
    wait_until(lambda: not live_placement_groups(), 60, "Serve's placement groups removed")


def _upload_dir(s3_server: str, bucket: str, prefix: str, folder) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def _nodes_of(deployments: set[str]) -> dict[str, set[str]]:
    """Serve deployment -> the nodes its live replicas run on (from the GCS actor table; no dashboard needed)."""
    import ray._private.state

    where: dict[str, set[str]] = {}
    for actor in ray._private.state.actors().values():
        name = actor.get("Name") or ""  # SERVE_REPLICA::imagine#Decoder#<id>
        if actor.get("State") != "ALIVE" or not name.startswith("SERVE_REPLICA::"):
            continue
        deployment = name.split("#")[1]
        if deployment in deployments:
            where.setdefault(deployment, set()).add(actor["Address"]["NodeID"])
    return where


def test_no_shared_disk_generate_and_edit_across_nodes_scaling_from_zero(
    cluster: tuple[Cluster, str], tmp_path, postgresql_url: str, s3_server: str, s3_bucket: str
) -> None:
    """Production's shape on two (simulated) GPU nodes: PostgreSQL as the store, S3 for artifacts and weights, no
    local artifacts dir, four 1-GPU stages that cannot share one node. The default denoiser pool starts at zero
    replicas: a job's queued demand (read from the store by the autoscaling policy) brings one up, the job and an
    edit of its video finish, the video downloads by its presigned URL without the API key, and the idle pool goes
    back to zero. The decoder starts at zero as well, brought up by Serve's own policy on its first request."""
    import boto3
    import httpx
    from serve_helpers import SMALL, Served, free_port, small_config

    from imagine.models.tiny import build_tiny_ltx2
    from imagine.models.tiny_grounding import build_tiny_grounding
    from imagine.models.tiny_vace import build_tiny_vace
    from imagine.serving.app import build_app

    weights = tmp_path / "weights"
    sources = {name: _upload_dir(s3_server, s3_bucket, f"models/{name}", build(weights / name))
               for name, build in (("tiny", build_tiny_ltx2), ("tiny-vace", build_tiny_vace),
                                   ("tiny-grounding", build_tiny_grounding))}
    home = tmp_path / "node-cache"  # each replica's own cache of the weights it downloads: nobody else reads it
    one_gpu = {"num_gpus": 1}
    config = small_config(
        home,
        stage_cpus=0.05,
        database_url=postgresql_url,
        artifacts=f"s3://{s3_bucket}/imagine",
        s3={"endpoint_url": s3_server, "presigned_url_ttl_s": 900},
        model={"source": sources["tiny"], "s3_endpoint_url": s3_server},
        edit={"enabled": True, "source": sources["tiny-vace"], "grounding_source": sources["tiny-grounding"],
              "max_work_pixels": 160 * 160, "default_steps": 2},
        ingress={"num_cpus": 0.05},
        text_encoder=one_gpu,
        # a plain stage at zero too: Serve's own policy starts it on the first request queued at its handle
        decoder={**one_gpu, "autoscaling": {"min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0}},
        editor=one_gpu,
        denoiser={**one_gpu, "autoscaling": {"min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0,
                                             "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2}},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    served = Served(config, port)

    def replicas(deployment: str = "Denoiser") -> dict[str, int]:
        states = serve.status().applications["imagine"].deployments[deployment].replica_states
        return {_name(k): v for k, v in states.items() if v}

    try:
        served.deploy()
        assert replicas() == {} and replicas("Decoder") == {}  # deployed at zero
        source_id = served.submit(seed=3, **SMALL)
        source = served.wait_terminal(source_id, timeout=300)
        assert source["status"] == "done", source
        cold_start_s = source["started_at"] - source["created_at"]
        print(f"\ncold start (first job's queue wait from zero denoiser replicas): {cold_start_s:.1f} s")

        edit = served.http.post("/v1/videos/edits", json={
            "video_id": source_id, "prompt": "remove the drum", "mask": {"boxes": [[96, 160, 256, 352]]}, "seed": 1})
        assert edit.status_code == 202, edit.text
        edited = served.wait_terminal(edit.json()["request_id"], timeout=300)
        assert edited["status"] == "done", edited

        nodes = _nodes_of({"TextEncoder", "Decoder", "Editor"})
        assert set().union(*nodes.values()) == gpu_node_ids(), nodes  # 1-GPU stages on both GPU nodes
        for job in (source, edited):
            url = served.job(job["id"])["video"]["url"]
            assert url.startswith(f"{s3_server}/{s3_bucket}/imagine/outputs/default/{job['id']}/video.mp4?"), url
            assert httpx.get(url, timeout=30).content[4:8] == b"ftyp"  # an MP4, without the API key
        keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
            Bucket=s3_bucket, Prefix="imagine/")["Contents"]}
        assert {f"imagine/outputs/default/{j['id']}/video.mp4" for j in (source, edited)} <= keys
        assert not (home / "artifacts").exists() and not (home / "imagine.db").exists()  # no local state at all

        wait_until(lambda: replicas() == {}, 90, "the idle denoiser pool back at zero replicas")
    finally:
        served.http.close()
        serve.shutdown()
    wait_until(lambda: not live_placement_groups(), 60, "Serve's placement groups removed")
