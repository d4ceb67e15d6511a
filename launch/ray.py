"""Ray: a placement group (one bundle per rank), one actor per rank, each holding its part of the model.

:func:`load_on_ray` is called once, by the Ray driver (a script, a notebook or a ``ray job``); it
returns a :class:`RankGroup` whose actors each called :func:`weightcast.workers.api.load_pretrained` and keep
the result. The launcher only produces the torchrun environment on each actor (MASTER_ADDR /
MASTER_PORT from rank 0's node and a free port chosen there, RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, WEIGHTCAST_NODE): the workers never know Ray started them.

Ranks are numbered node by node (the node of bundle 0 first), so each node holds consecutive
ranks and local ranks 0..k-1, as torchrun numbers them. With GPUs, every actor of a node sees the
node's Ray-assigned GPUs in local-rank order (``CUDA_VISIBLE_DEVICES``), so ``cuda:<local rank>``
is exactly the GPU Ray gave that actor; the global rank is never used as a device index.

``ray`` is an optional dependency (``pip install 'weightcast[ray]'``), imported inside functions.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from weightcast.orchestrator.errors import ConfigError, LoadError, WeightcastError

STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


class RankActor:
    """One rank. Ray wraps this class with ``ray.remote`` in :func:`load_on_ray`; the driver calls
    ``info`` (every actor), ``free_port`` (rank 0), ``load`` (every actor, started on all before
    waiting on any), then ``run`` any number of times, then ``close``."""

    def __init__(self) -> None:
        self.model: Any = None
        self.report: dict | None = None

    def info(self) -> dict:
        import ray
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid(), "host": socket.gethostname()}

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def load(self, env: dict[str, str], source: str, options: dict) -> dict:
        os.environ.update(env)
        from weightcast.workers.api import load_pretrained
        t0 = time.perf_counter()
        self.model, self.report = load_pretrained(source, return_report=True, **options)
        return {"rank": int(env["RANK"]), "seconds": time.perf_counter() - t0, "report": self.report}

    def run(self, fn: Callable[..., Any], args: tuple) -> Any:
        return fn(self.model, *args)

    def close(self) -> None:
        self.model = None
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class RankGroup:
    """The ranks of a load on Ray, in rank order. ``report`` is the gathered load report,
    ``seconds`` the driver's time from :func:`load_on_ray` to loaded, ``envs`` each rank's
    torchrun environment, ``infos`` what each rank's actor reported (node id, IP, GPU ids, pid)."""
    actors: list
    placement_group: Any
    envs: list[dict[str, str]]
    infos: list[dict] = field(default_factory=list)
    report: dict | None = None
    seconds: float = 0.0
    timeout: float = 300.0
    closed: bool = field(default=False, repr=False)

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> list:
        """``fn(model, *args)`` on every rank (in parallel); the results in rank order. ``fn`` is
        shipped with cloudpickle, so it may be a closure; it may use collectives over the group.
        ``timeout`` (seconds, default the load's) bounds the wait; it is not passed to ``fn``."""
        if self.closed:
            raise ConfigError("This RankGroup was shut down", where="RankGroup.run", fix="call load_on_ray again")
        refs = [a.run.remote(fn, args) for a in self.actors]
        return _get(refs, self.timeout if timeout is None else timeout, "RankGroup.run")

    def shutdown(self) -> None:
        """Destroy every rank's process group, kill the actors and remove the placement group
        (idempotent; nothing of this group is left in the cluster afterwards)."""
        if self.closed:
            return
        self.closed = True
        _teardown(self.actors, self.placement_group)

    def __enter__(self) -> "RankGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def load_on_ray(source: str, *, num_nodes: int = 1, gpus_per_node: int = 0, cpus_per_rank: float = 1,
                ranks_per_node: int | None = None, strategy: str | None = None, cluster: Any = None,
                timeout: float = 300.0, runtime_env: dict | None = None, **load_options: Any) -> RankGroup:
    """Start ``num_nodes x ranks_per_node`` rank actors and load ``source`` on them (driver only).

    ``ranks_per_node`` defaults to ``gpus_per_node`` (one GPU per rank), or 1 without GPUs.
    ``strategy``: ``STRICT_PACK`` (default for one node), ``PACK`` (default for several),
    ``SPREAD`` or ``STRICT_SPREAD`` (one rank per node). ``cluster`` (a ClusterSpec or a
    cluster YAML path) gives the node and rank layout instead, and is passed on to the load
    (storage locality, bandwidths); Ray must then place the ranks as the spec says.
    ``runtime_env`` is given to the actors (the package must be importable on every node:
    installed there, or shipped with ``{"working_dir": ...}`` as ``ray job submit --working-dir``
    does). ``load_options`` go to ``load_pretrained`` unchanged. Raises LoadError (naming what is
    missing) when Ray cannot place the group within ``timeout`` seconds.
    """
    import ray
    started = time.perf_counter()
    spec = _spec(cluster)
    world, gpus, strategy = _layout(spec, num_nodes, gpus_per_node, ranks_per_node, strategy)
    if not ray.is_initialized():
        ray.init()
    pg = _placement_group(world, gpus, cpus_per_rank, strategy, timeout)
    actors: list = []
    try:
        actors = _start_actors(pg, world, gpus, cpus_per_rank, runtime_env)
        infos = _get([a.info.remote() for a in actors], timeout, "starting the rank actors")
        envs, order = rank_envs(infos, [n for n, _ in _spec_nodes(spec)] if spec else None)
        if spec is not None:
            check_layout(spec, infos, order)
        actors = [actors[i] for i in order]
        port = _get([actors[0].free_port.remote()], timeout, "choosing the rendezvous port")[0]
        for env in envs:
            env.update(MASTER_ADDR=infos[order[0]]["ip"], MASTER_PORT=str(port))
        options = dict(load_options, timeout=timeout, **({"cluster": spec} if spec is not None else {}))
        refs = [a.load.remote(env, source, options) for a, env in zip(actors, envs)]  # all start first
        results = _get(refs, timeout + 60, "loading")
    except BaseException:
        _teardown(actors, pg)
        raise
    return RankGroup(actors, pg, envs, [infos[i] for i in order], report=results[0]["report"],
                     seconds=time.perf_counter() - started, timeout=timeout)


def _spec(cluster: Any):
    if cluster is None:
        return None
    from weightcast.orchestrator.cluster import ClusterSpec, load_cluster
    return cluster if isinstance(cluster, ClusterSpec) else load_cluster(os.fspath(cluster))


def _spec_nodes(spec) -> list[tuple[str, int]]:
    return [(n, spec.local_world_size(n)) for n in spec.nodes]


def _layout(spec, num_nodes: int, gpus_per_node: int, ranks_per_node: int | None,
            strategy: str | None) -> tuple[int, int, str]:
    """(world size, GPUs per rank, placement strategy), checked."""
    if spec is not None:
        nodes = _spec_nodes(spec)
        num_nodes, ranks_per_node = len(nodes), max(k for _, k in nodes)
        gpus_per_node = ranks_per_node if spec.ranks[0].device.startswith("cuda") else 0
        world = spec.world_size
    else:
        if ranks_per_node is None:
            ranks_per_node = gpus_per_node or 1
        world = num_nodes * ranks_per_node
    if num_nodes < 1 or ranks_per_node < 1:
        raise ConfigError("A Ray load needs at least one node and one rank per node", where="load_on_ray",
                          got=f"num_nodes={num_nodes}, ranks_per_node={ranks_per_node}")
    if gpus_per_node and gpus_per_node != ranks_per_node:
        raise ConfigError("With GPUs each rank owns one GPU", where="load_on_ray",
                          expected=f"ranks_per_node == gpus_per_node ({gpus_per_node})", got=ranks_per_node)
    strategy = strategy or ("STRICT_PACK" if num_nodes == 1 else "PACK")
    if strategy not in STRATEGIES:
        raise ConfigError("Unknown placement strategy", where="load_on_ray(strategy=...)",
                          expected=", ".join(STRATEGIES), got=repr(strategy))
    if strategy == "STRICT_PACK" and num_nodes > 1:
        raise ConfigError("STRICT_PACK puts every rank on one node", where="load_on_ray",
                          got=f"num_nodes={num_nodes}", fix="use strategy='PACK' or 'STRICT_SPREAD'")
    if strategy == "STRICT_SPREAD" and ranks_per_node > 1:
        raise ConfigError("STRICT_SPREAD puts each rank on its own node", where="load_on_ray",
                          got=f"ranks_per_node={ranks_per_node}", fix="use strategy='PACK'")
    return world, (1 if gpus_per_node else 0), strategy


def _placement_group(world: int, gpus: int, cpus: float, strategy: str, timeout: float):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([dict(bundle) for _ in range(world)], strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise LoadError("Ray could not place the ranks", where=f"placement group of {world} x {bundle}, {strategy}",
                        expected=f"{world} bundles of {bundle} within {timeout:.0f} s",
                        got=f"available resources: {ray.available_resources()}",
                        fix="start more nodes, ask for fewer ranks or CPUs per rank, or another strategy "
                            "(keep a CPU free for the driver and other tasks)") from None
    return pg


def _start_actors(pg, world: int, gpus: int, cpus: float, runtime_env: dict | None) -> list:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    remote = ray.remote(RankActor)
    extra = {"runtime_env": runtime_env} if runtime_env else {}
    return [remote.options(num_cpus=cpus, num_gpus=gpus, max_concurrency=1, **extra,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                               placement_group=pg, placement_group_bundle_index=i)).remote()
            for i in range(world)]


def rank_envs(infos: Sequence[dict], node_names: Sequence[str] | None = None
              ) -> tuple[list[dict[str, str]], list[int]]:
    """Each rank's environment (without MASTER_ADDR/PORT) and the actor index of each rank.

    ``infos[i]`` is what actor ``i`` reported (``node_id``, ``gpu_ids``). Nodes are ordered by
    their first actor; ranks are consecutive per node. ``WEIGHTCAST_NODE`` is the Ray node id,
    or ``node_names[k]`` for the k-th node when a cluster spec names them. With GPUs, each
    actor sees its node's GPUs in local-rank order."""
    nodes: dict[str, list[int]] = {}
    for i, info in enumerate(infos):
        nodes.setdefault(info["node_id"], []).append(i)
    order = [i for members in nodes.values() for i in members]
    envs = []
    for k, (node_id, members) in enumerate(nodes.items()):
        gpu_ids = [g for i in members for g in infos[i]["gpu_ids"][:1]]
        for local, i in enumerate(members):
            env = {"RANK": str(len(envs)), "LOCAL_RANK": str(local), "WORLD_SIZE": str(len(infos)),
                   "LOCAL_WORLD_SIZE": str(len(members)),
                   "WEIGHTCAST_NODE": node_names[k] if node_names and k < len(node_names) else node_id}
            if len(gpu_ids) == len(members) and gpu_ids:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
            envs.append(env)
    return envs, order


def check_layout(spec, infos: Sequence[dict], order: Sequence[int]) -> None:
    """Raise ConfigError unless Ray placed as many ranks on each node as the spec says, in order."""
    got: list[int] = []
    last = None
    for i in order:
        if infos[i]["node_id"] != last:
            got.append(0)
            last = infos[i]["node_id"]
        got[-1] += 1
    want = [k for _, k in _spec_nodes(spec)]
    if got != want:
        raise ConfigError("Ray placed the ranks differently from the cluster spec",
                          where=f"cluster {spec.name!r}", expected=f"ranks per node {want}", got=f"{got}",
                          fix="give the Ray cluster the nodes the spec describes, or pass cluster=None "
                              "to use the layout Ray chose")


def _get(refs: list, timeout: float, what: str) -> list:
    """``ray.get`` with a deadline; a rank's WeightcastError is raised as itself."""
    import ray
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise LoadError(f"Ray ranks did not finish {what} in time", where=f"{len(refs)} rank actors",
                        expected=f"done within {timeout:.0f} s", got="still running",
                        fix="check the actors' logs (ray logs / the dashboard); raise timeout=") from None
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, WeightcastError):
            raise cause from None
        raise LoadError(f"A rank actor failed while {what}", where="Ray actor",
                        got=f"{type(cause or exc).__name__}: {str(cause or exc)[-2000:]}") from None
    except ray.exceptions.RayActorError as exc:
        raise LoadError(f"A rank actor died while {what}", where="Ray actor", got=str(exc)[-2000:],
                        fix="check memory and the actor's log") from None


def _teardown(actors: list, pg: Any) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group
    if actors:
        try:
            ray.get([a.close.remote() for a in actors], timeout=30)
        except Exception:  # noqa: BLE001 - the actors are killed below anyway
            pass
    for a in actors:
        ray.kill(a, no_restart=True)
    if pg is not None:
        remove_placement_group(pg)
