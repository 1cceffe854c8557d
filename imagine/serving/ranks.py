"""A group of rank workers (Ray actors) forming one torch.distributed group, placed on one node, driven as one:
every call runs on all ranks and rank 0 answers. Generic: the per-rank object comes from a factory; this module
knows no model. A parallel Denoiser replica owns one `RankGroup`."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    RayError,
    RayTaskError,
)
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from imagine.parallel.dist import default_backend, destroy_distributed, free_port, init_distributed

logger = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]
RankFactory = Callable[[int, int], Any]

# After the first rank fails, how long to let the others report before blaming one: a rank that dies makes its
# peers fail at once ("connection closed by peer"), and Ray reports the death itself a moment later; waiting this
# long lets the error name the rank that died (the cause) rather than a peer (the symptom). Bounded and short.
FAILURE_GRACE_S = 2.0
# The rank actors' default concurrency group runs one call at a time (collectives must not interleave); the
# "control" group answers pings and rendezvous while a long call is in flight.
CONTROL_GROUP = "control"
# How often a restart looks whether a killed rank's process is gone (no event to wait on for another's process).
EXIT_POLL_S = 0.05


class PlacementTimeout(TimeoutError):
    """The group's devices could not be reserved on one node in time. Nothing was started and nothing is held;
    the caller may keep its work queued and try `start()` again later (e.g. after the cluster scales up)."""


class RankFailure(RuntimeError):
    """A rank raised, died, or did not finish in time. The group has killed all its ranks (the others may be stuck
    in a collective) and is broken until `restart()`. `rank` is the rank to blame (None when ranks timed out)."""

    def __init__(self, message: str, rank: int | None = None, cause: BaseException | None = None):
        super().__init__(message)
        self.rank = rank
        self.cause = cause


@dataclass(frozen=True)
class _KilledRank:
    """A rank killed but not yet seen to exit: its actor, and (node id, pid) of its process once it reported them."""

    rank: int
    worker: Any
    process: tuple[str, int] | None


@dataclass(frozen=True)
class RankInfo:
    """Where a rank runs, as reported by the rank itself after it joined the process group."""

    rank: int
    node_id: str
    node_ip: str
    pid: int
    gpu_ids: tuple[str, ...]


def _rank_bundle(device: Device, cpus_per_rank: float, declare_gpus: bool) -> dict[str, float]:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not declare_gpus:
        raise ValueError("device='cuda' needs declare_gpus=True: Ray assigns each rank its GPU from the bundle")
    if cpus_per_rank < 0:
        raise ValueError(f"cpus_per_rank must be >= 0, got {cpus_per_rank}")
    bundle = {"CPU": float(cpus_per_rank)}
    if declare_gpus:
        bundle["GPU"] = 1.0
    if not any(bundle.values()):
        raise ValueError("a rank bundle needs some resource: cpus_per_rank > 0 or declare_gpus=True")
    return bundle


def rank_bundles(
    world_size: int, device: Device, cpus_per_rank: float, replica_cpus: float, declare_gpus: bool
) -> list[dict[str, float]]:
    """The `placement_group_bundles` of a replica that hosts a `world_size`-rank group.

    Serve places the replica actor itself into bundle 0 (its `ray_actor_options` must fit there, so bundle 0 is
    `{"CPU": replica_cpus}`) and creates the replica with `placement_group_capture_child_tasks=True`, so the
    actors it starts are scheduled into the same placement group; `RankGroup.start()` puts rank i into bundle
    i + 1 explicitly. Each rank bundle is `{"CPU": cpus_per_rank, "GPU": 1}` when GPUs are declared (always for
    CUDA; on CPU, declaring them lets tests and CPU clusters model GPU nodes). Use strategy STRICT_PACK: one node.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if replica_cpus <= 0:
        raise ValueError(f"replica_cpus must be > 0 (Ray refuses an empty bundle 0), got {replica_cpus}")
    return [{"CPU": float(replica_cpus)}] + [_rank_bundle(device, cpus_per_rank, declare_gpus)] * world_size


def _cuda_device_index() -> int:
    """The CUDA index of this actor's GPU. Ray narrows CUDA_VISIBLE_DEVICES to the actor's GPU, so it is 0;
    if that narrowing was turned off, the Ray GPU id is the CUDA index."""
    import torch

    if torch.cuda.device_count() == 1:
        return 0
    gpu_ids = ray.get_gpu_ids()
    if len(gpu_ids) != 1:
        raise RuntimeError(f"a CUDA rank needs exactly one Ray GPU, got {gpu_ids}")
    return int(gpu_ids[0])


@ray.remote(concurrency_groups={CONTROL_GROUP: 2})
class RankWorker:
    """One rank: joins the process group, builds the factory's object, and runs its methods by name.

    Threaded actor: `setup`/`run` share the default group (one at a time, in order), `ping`/`rendezvous` have
    their own, so a health check answers while a long call is in flight.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.obj: Any = None

    @ray.method(concurrency_group=CONTROL_GROUP)
    def rendezvous(self) -> tuple[str, int]:
        """(node IP, free port) for the group's master; asked of rank 0, whose node all ranks share."""
        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ping(self) -> int:
        return self.rank

    @ray.method(concurrency_group=CONTROL_GROUP)
    def process(self) -> tuple[str, int]:
        """(Ray node id, pid) of this rank's process: where a restart waits for it to exit once killed."""
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def setup(
        self, master_addr: str, master_port: int, backend: str, factory: RankFactory, timeout_s: float
    ) -> RankInfo:
        """Join the group (bounded by `timeout_s`, also the collectives' timeout), then build the rank object."""
        local_rank = self.rank
        if backend == "nccl":
            import torch

            local_rank = _cuda_device_index()  # DeepSpeed binds the NCCL group to cuda:LOCAL_RANK
            torch.cuda.set_device(local_rank)
        init_distributed(
            self.rank,
            self.world_size,
            master_addr,
            master_port,
            backend=backend,
            timeout_s=timeout_s,
            local_rank=local_rank,
        )
        self.obj = factory(self.rank, self.world_size)
        context = ray.get_runtime_context()
        gpu_ids = tuple(str(i) for i in context.get_accelerator_ids().get("GPU", []))
        return RankInfo(self.rank, context.get_node_id(), ray.util.get_node_ip_address(), os.getpid(), gpu_ids)

    def run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.obj is None:
            raise RuntimeError(f"rank {self.rank} has no object: setup() did not run or failed")
        bound = getattr(self.obj, method, None)
        if bound is None or not callable(bound):
            raise AttributeError(f"{type(self.obj).__name__} has no method {method!r}")
        return bound(*args, **kwargs)

    def teardown(self) -> None:
        self.obj = None
        destroy_distributed()


class RankGroup:
    """`world_size` rank workers on one node, joined in one torch.distributed group, called as one.

    Inside a placement group (a Serve replica declared with `rank_bundles(...)`), rank i goes into bundle i + 1
    of the replica's group; elsewhere (tests, scripts) the group reserves its own STRICT_PACK placement group and
    removes it on `shutdown()`. Rank actors are owned by the process that started them: they die with it.

    Calls are serialized (collectives must run in the same order on every rank) and fail fast: if any rank raises
    or dies, all ranks are killed, `RankFailure` is raised and the group stays broken until `restart()`. A hung
    collective is bounded by `collective_timeout_s`, after which its rank raises. `call` blocks: from async code,
    run it in a thread.
    """

    def __init__(
        self,
        world_size: int,
        factory: RankFactory,
        device: Device = "cpu",
        *,
        cpus_per_rank: float = 1.0,
        declare_gpus: bool | None = None,
        placement_timeout_s: float = 60.0,
        setup_timeout_s: float = 300.0,
        collective_timeout_s: float = 600.0,
        call_timeout_s: float | None = None,
        exit_timeout_s: float = 30.0,
    ):
        """`factory(rank, world_size)` runs in each rank after the process group is up (must be picklable).
        `declare_gpus` defaults to `device == "cuda"`. `setup_timeout_s` bounds actor start + join + factory;
        `call_timeout_s` is the default bound of one call (None: only the collective timeout bounds it);
        `exit_timeout_s` bounds how long `restart()` / `shutdown()` wait for killed ranks' processes to exit."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        for name, value in (
            ("placement_timeout_s", placement_timeout_s),
            ("setup_timeout_s", setup_timeout_s),
            ("collective_timeout_s", collective_timeout_s),
            ("exit_timeout_s", exit_timeout_s),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.world_size = world_size
        self.factory = factory
        self.device: Device = device
        self.backend = default_backend(device)
        self.cpus_per_rank = cpus_per_rank
        self.declare_gpus = device == "cuda" if declare_gpus is None else declare_gpus
        self._bundle = _rank_bundle(device, cpus_per_rank, self.declare_gpus)  # validates the arguments
        self.placement_timeout_s = placement_timeout_s
        self.setup_timeout_s = setup_timeout_s
        self.collective_timeout_s = collective_timeout_s
        self.call_timeout_s = call_timeout_s
        self.exit_timeout_s = exit_timeout_s

        self._call_lock = threading.Lock()  # one call (and start) at a time
        self._state_lock = threading.Lock()  # guards the fields below; never held while waiting on ranks
        self._workers: list[ray.actor.ActorHandle] = []
        self._processes: list[tuple[str, int]] = []  # (node id, pid) of each of `_workers`, once they reported
        self._killed: list[_KilledRank] = []  # killed ranks whose exit the next restart() / shutdown() waits for
        self._info: list[RankInfo] = []
        self._pg: PlacementGroup | None = None
        self._own_pg = False
        self._first_bundle = 0
        self._broken = False
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """Started, every rank answered its setup, and no call has failed since."""
        with self._state_lock:
            return bool(self._workers) and bool(self._info) and not self._broken and not self._closed

    def start(self) -> None:
        """Reserve the devices, start the ranks, join them in one group and build their objects.

        Raises `PlacementTimeout` (nothing held) if the ranks cannot be placed within `placement_timeout_s`, and
        `RankFailure` (group broken) if a rank fails to start, join, or build its object.
        """
        with self._call_lock:
            with self._state_lock:
                if self._closed:
                    raise RuntimeError("RankGroup was shut down; create a new one")
                if self._workers:
                    raise RuntimeError("RankGroup already started; use restart() to replace its ranks")
            self._reserve()
            self._launch()

    def restart(self) -> None:
        """Kill the current ranks (stuck or not), wait (bounded) until their processes, and any killed by a failed
        call before, have exited -- so the new ranks find the device memory free -- and start a fresh group on the
        same reservation (new port)."""
        self._kill_ranks()
        self._wait_for_exits()
        self.start()

    def shutdown(self) -> None:
        """Kill the ranks, wait (bounded) for their processes to exit, and release the placement group this object
        created. Idempotent. A call in flight fails with `RankFailure`."""
        self._kill_ranks()
        with self._state_lock:
            self._closed = True
            pg, own = self._pg, self._own_pg
            self._pg, self._own_pg = None, False
        self._wait_for_exits()  # before the devices go back to Ray: nothing may be placed on them while still held
        if pg is not None and own:
            remove_placement_group(pg)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # -- calls ----------------------------------------------------------------------------------------------------
    def call(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        """Run `obj.method(*args, **kwargs)` on every rank; return rank 0's result (raises `RankFailure`)."""
        return self.call_all(method, *args, timeout_s=timeout_s, **kwargs)[0]

    def call_all(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list[Any]:
        """Run `obj.method(*args, **kwargs)` on every rank; return every rank's result, in rank order.

        Each argument is put into the object store once and shared by all ranks (a top-level `ObjectRef` is
        passed as is and arrives resolved). `timeout_s` (default `call_timeout_s`) bounds the whole call.
        """
        with self._call_lock:
            with self._state_lock:
                workers = self._usable_workers()
            if self.world_size > 1:
                args = tuple(_shared(a) for a in args)
                kwargs = {k: _shared(v) for k, v in kwargs.items()}
            refs = [w.run.remote(method, *args, **kwargs) for w in workers]
            timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
            return self._gather(refs, f"call {method!r}", timeout_s, workers)

    def check_health(self, timeout_s: float = 10.0) -> None:
        """Raise `RankFailure` if the group is broken or a rank does not answer a ping within `timeout_s`; pings
        run beside a call in flight, so this suits Serve's `check_health`."""
        with self._state_lock:
            workers = self._usable_workers()
        self._gather([w.ping.remote() for w in workers], "ping", timeout_s, workers)

    # -- introspection --------------------------------------------------------------------------------------------
    @property
    def info(self) -> list[RankInfo]:
        """Where each rank runs (node, IP, pid, GPU ids), in rank order, as reported at setup."""
        with self._state_lock:
            if not self._info:
                raise RuntimeError("RankGroup is not started")
            return list(self._info)

    def node_ids(self) -> list[str]:
        """Each rank's Ray node id, in rank order."""
        return [i.node_id for i in self.info]

    @property
    def placement_group(self) -> PlacementGroup | None:
        """The placement group the ranks run in (the replica's, or this group's own); None before start."""
        return self._pg

    # -- internals ------------------------------------------------------------------------------------------------
    def _reserve(self) -> None:
        """Find or create the placement group; rank i runs in bundle `_first_bundle + i`."""
        if self._pg is not None:
            if self._own_pg:  # after a node loss Ray re-places a group's bundles; wait for it again
                self._wait_placed(self._pg, remove_on_timeout=False)
            return
        current = get_current_placement_group()
        if current is not None:
            self._check_replica_bundles(current)
            self._pg, self._own_pg, self._first_bundle = current, False, 1
            return
        pg = placement_group([dict(self._bundle) for _ in range(self.world_size)], strategy="STRICT_PACK")
        self._wait_placed(pg, remove_on_timeout=True)
        self._pg, self._own_pg, self._first_bundle = pg, True, 0

    def _wait_placed(self, pg: PlacementGroup, remove_on_timeout: bool) -> None:
        ready, _ = ray.wait([pg.ready()], timeout=self.placement_timeout_s)
        if ready:
            return
        if remove_on_timeout:
            remove_placement_group(pg)
        raise PlacementTimeout(
            f"could not place {self.world_size} ranks of {self._bundle} on one node within "
            f"{self.placement_timeout_s}s (strategy STRICT_PACK); cluster has {ray.available_resources()} free"
        )

    def _check_replica_bundles(self, pg: PlacementGroup) -> None:
        """Fail now, with the numbers, if the replica's placement group cannot hold the ranks (they would wait
        forever for resources no bundle has)."""
        specs = pg.bundle_specs
        needed = 1 + self.world_size
        if len(specs) < needed:
            raise ValueError(
                f"the current placement group has {len(specs)} bundles; {self.world_size} ranks need {needed} "
                f"(bundle 0 for the replica + one per rank): declare placement_group_bundles=rank_bundles(...)"
            )
        for i in range(self.world_size):
            spec = specs[1 + i]
            short = {k: v for k, v in self._bundle.items() if v > 0 and spec.get(k, 0.0) < v}
            if short:
                raise ValueError(f"bundle {1 + i} {spec} cannot hold rank {i}, which needs {self._bundle}")

    def _launch(self) -> None:
        assert self._pg is not None
        workers = [
            RankWorker.options(
                num_cpus=self.cpus_per_rank,
                num_gpus=1 if self.declare_gpus else 0,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=self._first_bundle + rank
                ),
            ).remote(rank, self.world_size)
            for rank in range(self.world_size)
        ]
        with self._state_lock:
            self._workers, self._processes, self._info, self._broken = workers, [], [], False
        deadline = time.monotonic() + self.setup_timeout_s
        # where each rank's process runs, first: a rank killed later (even in a failed setup) is then waited for
        processes = self._gather([w.process.remote() for w in workers], "start", self.setup_timeout_s, workers)
        with self._state_lock:
            if self._workers is workers:
                self._processes = [tuple(p) for p in processes]
        (master,) = self._gather(
            [workers[0].rendezvous.remote()], "rendezvous", max(0.0, deadline - time.monotonic()), workers
        )
        addr, port = master
        refs = [w.setup.remote(addr, port, self.backend, self.factory, self.collective_timeout_s) for w in workers]
        info = self._gather(refs, "setup", max(0.0, deadline - time.monotonic()), workers)
        with self._state_lock:
            if self._workers is workers:  # not killed meanwhile by shutdown()
                self._info = info
        logger.info(
            "rank group up: %d ranks (%s) on node %s, master %s:%d",
            self.world_size,
            self.backend,
            info[0].node_id,
            addr,
            port,
        )

    def _gather(
        self, refs: Sequence[ray.ObjectRef], what: str, timeout_s: float | None, workers: Sequence[Any]
    ) -> list[Any]:
        """Wait for one result per rank (refs in rank order, sent to `workers`). On the first failure or the
        timeout: kill those ranks, mark the group broken (if they are still its ranks) and raise `RankFailure`
        naming the rank to blame."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
            if not ready:
                self._fail(workers)
                late = sorted(rank_of[r] for r in pending)
                raise RankFailure(
                    f"{what}: rank(s) {late} of {len(refs)} did not finish within {timeout_s}s; killed all ranks"
                )
            ref = ready[0]
            try:
                results[rank_of[ref]] = ray.get(ref)
            except RayError as first:
                # let the peers report too (bounded), so the error can name the rank that caused it
                more = ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S)[0] if pending else []
                self._fail(workers)
                raise _blame(what, {rank_of[r]: r for r in [ref, *more]}) from first
        return [results[rank] for rank in range(len(refs))]

    def _usable_workers(self) -> list[ray.actor.ActorHandle]:
        """The ranks, or the reason there are none to call (caller holds `_state_lock`)."""
        if self._closed:
            raise RuntimeError("RankGroup was shut down")
        if self._broken:
            raise RankFailure("RankGroup is broken by an earlier failure; restart() it")
        if not self._workers or not self._info:
            raise RuntimeError("RankGroup is not started")
        return self._workers  # never mutated, only replaced: its identity tells a call's ranks from a restart's

    def _fail(self, workers: Sequence[Any]) -> None:
        """The call to `workers` failed: kill them and break the group, unless `restart()` already replaced them
        (a late ping of the old ranks, say, must not kill the new ones)."""
        self._kill_ranks(broken=True, only=workers)

    def _kill_ranks(self, broken: bool = False, only: Sequence[Any] | None = None) -> None:
        """Kill every rank at once (no graceful teardown: a rank may be stuck in a collective) and remember them,
        so the next `restart()` / `shutdown()` waits for their processes to exit. With `only`: just those ranks,
        and the group's state changes only if they are its current ranks (others were killed, and remembered, by
        whatever replaced them)."""
        with self._state_lock:
            workers = self._workers if only is None else only
            if workers and workers is self._workers:
                processes = self._processes or [None] * len(workers)
                self._killed += [_KilledRank(r, w, p) for r, (w, p) in enumerate(zip(workers, processes))]
                self._workers, self._processes, self._info, self._broken = [], [], [], broken
        for worker in workers:
            ray.kill(worker, no_restart=True)

    def _wait_for_exits(self) -> None:
        """Wait until every remembered killed rank's process has exited, `exit_timeout_s` for all of them; a rank
        past it is logged (rank, pid) and left behind. `ray.kill` returns at once, while the process may still hold
        its device memory. A process on this node is watched by its pid; one elsewhere (or one killed before it
        reported its pid) until its actor is reported dead, which Ray may do slightly before the process is gone."""
        with self._state_lock:
            killed, self._killed = self._killed, []
        if not killed:
            return
        here = ray.get_runtime_context().get_node_id()
        deadline = time.monotonic() + self.exit_timeout_s
        for k in killed:
            if k.process is not None and k.process[0] == here:
                exited = _wait_pid_exit(k.process[1], deadline)
            else:
                exited = _wait_actor_died(k.worker, deadline)
            if not exited:
                pid = "unknown" if k.process is None else k.process[1]
                logger.warning(
                    "rank %d (pid %s, node %s) was killed but has not exited within %.0fs; going on without waiting",
                    k.rank, pid, "unknown" if k.process is None else k.process[0], self.exit_timeout_s,
                )


def process_running(pid: int) -> bool:
    """Whether process `pid` of this machine still runs. A zombie (exited, not yet reaped by its parent) does not:
    its memory, device memory included, is already released."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    if not Path("/proc/self/stat").exists():
        return True  # no procfs: the pid exists, zombie or not
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False  # exited meanwhile
    return state not in ("Z", "X")


def _wait_pid_exit(pid: int, deadline: float) -> bool:
    while process_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(EXIT_POLL_S)
    return True


def _wait_actor_died(worker: Any, deadline: float) -> bool:
    """Ping a killed rank until Ray reports its actor dead (True) or `deadline` passes (False)."""
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            ray.get(worker.ping.remote(), timeout=remaining)
        except ActorUnavailableError:
            pass  # transient (e.g. being killed); ask again
        except RayActorError:
            return True
        except GetTimeoutError:
            return False
        time.sleep(min(EXIT_POLL_S, max(0.0, deadline - time.monotonic())))
    return False


def _shared(value: Any) -> Any:
    """Put `value` into the object store once, so N ranks read one copy (Ray resolves top-level refs)."""
    return value if isinstance(value, ray.ObjectRef) else ray.put(value)


def _error_of(ref: ray.ObjectRef) -> RayError | None:
    try:
        ray.get(ref, timeout=0)
    except RayError as e:
        return e
    return None


def _blame(what: str, finished: Mapping[int, ray.ObjectRef]) -> RankFailure:
    """One error for a failed call: blame a rank that died (its peers' errors are symptoms), else the lowest rank
    that raised; mention every failure seen."""
    errors = {rank: e for rank, ref in sorted(finished.items()) if (e := _error_of(ref)) is not None}
    died = [r for r, e in errors.items() if isinstance(e, (ActorDiedError, ActorUnavailableError))]
    rank = died[0] if died else min(errors)
    error = errors[rank]
    cause: BaseException = error.cause if isinstance(error, RayTaskError) and error.cause is not None else error
    detail = "; ".join(f"rank {r}: {_describe(e)}" for r, e in errors.items())
    verb = "died" if died else "raised"
    return RankFailure(f"{what}: rank {rank} {verb} ({detail}); killed all ranks", rank=rank, cause=cause)


def _describe(error: RayError) -> str:
    if isinstance(error, RayTaskError) and error.cause is not None:
        return f"{type(error.cause).__name__}: {error.cause}"
    if isinstance(error, (ActorDiedError, ActorUnavailableError)):
        return f"process died ({type(error).__name__})"
    return f"{type(error).__name__}: {error}"


class RankedLoop:
    """The `imagine.serving.runner.Loop` of a parallel replica: every call runs on all ranks of a `RankGroup` (the
    loop state stays on them); rank 0's answer is returned. A dead or failed rank raises `RankFailure`; the group
    is rebuilt at the next `begin`."""

    def __init__(self, group: RankGroup):
        self.group = group
        self.failed_restarts = 0  # in a row; the replica reports itself unhealthy past a limit

    def begin(self, request: Any, conditioning: Any, resume: Any | None) -> tuple[int, int]:
        if not self.group.healthy:
            logger.warning("rank group is broken; restarting it")
            try:
                self.group.restart()
            except Exception:
                self.failed_restarts += 1
                raise
            self.failed_restarts = 0
        return self.group.call("begin", request, conditioning, resume)

    def step(self) -> int:
        return self.group.call("step")

    def snapshot(self) -> Any:
        return self.group.call("snapshot")

    def finish(self) -> Any:
        return self.group.call("finish")
