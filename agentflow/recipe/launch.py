"""``agentflow launch``: the ``agentflow train`` run, placed on a Ray cluster, top to bottom.

:func:`launch` connects to Ray (``launch.address``, else ``RAY_ADDRESS``, else a local cluster it
starts), checks that the request fits the cluster, reserves two placement groups, starts
``launch.servers`` inference servers (:class:`~agentflow.recipe._actors.ServerActor`) and waits for
each one's ``/health``, then starts one trainer rank per GPU
(:class:`~agentflow.recipe._actors.RankActor`), each running ``agentflow train`` with torchrun's
environment and ``inference.addresses`` set to the servers. It then watches every actor:

- a server that dies is restarted on its bundle at the same address, at most
  ``launch.max_server_restarts`` times (each logged); the trainer's server pool rejoins it with
  the current weights. A server out of restarts is left down and the run goes on without it;
- a trainer rank that dies stops the job with an error naming the rank and how to resume;
- Ctrl-C (or SIGTERM) stops the ranks gracefully (``trainer.stop_grace_s``), then the servers.

Not here: what a rank runs (:func:`agentflow.recipe.train`, unchanged), placement arithmetic
(:mod:`agentflow.recipe._placement`), the actors (:mod:`agentflow.recipe._actors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import Any

import yaml

from agentflow._checkpoint import Checkpointer
from agentflow.config import build, merge_sources, to_dict
from agentflow.errors import ConfigError, EngineError, Interrupted
from agentflow.recipe._placement import Group, check_fits, get_within, plan, reserve, resource_of, wait_within
from agentflow.recipe._startup import check_run_dir
from agentflow.recipe.config import TrainRecipeConfig

__all__ = ["launch", "load_launch_config"]

log = logging.getLogger("agentflow.launch")

KEY_ENV = "AGENTFLOW_LAUNCH_API_KEY"  # how the ranks get the servers' key (never written to a file)
NAMESPACE = "agentflow"


def launch(cfg: TrainRecipeConfig, *, resume: bool = False, verbose: bool = False) -> str:
    """Run ``cfg`` on Ray as ``agentflow launch`` does; returns a one-line summary.

    Raises:
        ConfigError: Ray is missing, or the placement cannot be satisfied (the message names what
            was asked and what the cluster has).
        EngineError: a server never became healthy, or a trainer rank died.
        Interrupted: Ctrl-C or SIGTERM stopped the job (the ranks checkpointed on the way out).
    """
    ray = _import_ray()
    check_run_dir(cfg, resume)  # a bad --resume fails before anything is placed
    cfg = _with_remote_weights(cfg)
    with _connected(ray, cfg) as resource:
        job = _Job(ray, cfg, resource)
        try:
            job.place()
            job.start_servers()
            job.start_ranks(resume=resume, verbose=verbose)
            job.watch()
        except KeyboardInterrupt as e:
            job.stop_ranks()
            sig = "SIGTERM" if str(e) == "SIGTERM" else "SIGINT"
            raise Interrupted(f"{sig}: stopped every rank and server; {job.where()}",
                              exit_code=143 if sig == "SIGTERM" else 130) from None
        finally:
            job.teardown()
    return (f"launched {job.world} trainer rank(s) and {len(job.servers)} server(s) ({job.restarts} server "
            f"restart(s)); run directory: {cfg.logging.run_dir}")


def load_launch_config(files: Sequence[str] = (), overrides: Sequence[str] = ()) -> TrainRecipeConfig:
    """The run's config as ``agentflow launch`` reads it: ``inference.backend=remote`` (the launched
    servers), and ``trainer.weight_update`` disk unless it says nccl or disk."""
    data = merge_sources(files, overrides)
    data.setdefault("inference", {})["backend"] = "remote"
    trainer = data.setdefault("trainer", {})
    if trainer.get("weight_update", "mem") == "mem":
        trainer["weight_update"] = "disk"
    cfg = build(TrainRecipeConfig, data)
    from agentflow.engines.remote.protocol import PROTOCOLS

    if cfg.inference.protocol not in PROTOCOLS:
        raise ConfigError(f"inference.protocol must be one of {sorted(PROTOCOLS)}; got {cfg.inference.protocol!r}")
    return cfg


def _import_ray() -> Any:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every actor's lines, not "[repeated 2x across cluster]"
    try:
        import ray
    except ImportError as e:
        raise ConfigError("agentflow launch runs on Ray, and `import ray` failed; install it with "
                          "`pip install 'agentflow-rl[ray]'`, or use agentflow train (under torchrun)") from e
    return ray


def _with_remote_weights(cfg: TrainRecipeConfig) -> TrainRecipeConfig:
    """Launched ranks always use the servers; in-process weight hand-off becomes disk (logged)."""
    if cfg.trainer.weight_update != "mem":
        return cfg
    log.warning("trainer.weight_update=mem needs the in-process engine; the launched servers get disk updates "
                "(set trainer.weight_update=disk or nccl to choose)")
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, weight_update="disk"))


@contextlib.contextmanager
def _connected(ray: Any, cfg: TrainRecipeConfig) -> Iterator[str]:
    """Connect (or start a local cluster sized for the request); yields ``GPU`` or ``CPU``."""
    spec = cfg.launch
    started = not ray.is_initialized()
    if started:
        address = spec.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
        else:  # logical CPUs: enough for every actor of a CPU launch on this machine
            need = spec.servers + spec.nodes * spec.ranks_per_node
            ray.init(num_cpus=max(need, os.cpu_count() or 1), include_dashboard=False, namespace=NAMESPACE)
    try:
        yield resource_of(spec, ray.cluster_resources())
    finally:
        if started:
            ray.shutdown()


@dataclasses.dataclass
class _Server:
    index: int
    actor: Any = None
    address: str = ""
    port: int = 0
    restarts: int = 0


class _Job:
    """The placed actors of one launch and what the watcher knows about them."""

    def __init__(self, ray: Any, cfg: TrainRecipeConfig, resource: str) -> None:
        self.ray, self.cfg, self.spec, self.resource = ray, cfg, cfg.launch, resource
        self.groups: tuple[Group, Group] = plan(self.spec, resource)
        self.pgs: list[Any] = []
        self.servers = [_Server(i, port=self.spec.server_port + i if self.spec.server_port else 0)
                        for i in range(self.spec.servers)]
        self.ranks: list[Any] = []
        self.world = self.spec.nodes * self.spec.ranks_per_node
        # a generated key starts with a letter: token_urlsafe can start with '-', which a server's
        # argument parser reads as an option ("--api-key -x...": expected one argument)
        self.key = cfg.inference.api_key or f"af-{secrets.token_urlsafe(24)}"
        self.restarts = 0
        self.waiting: dict[Any, tuple[str, int]] = {}  # the watcher's refs -> (what, index)

    # ------------------------------------------------------------------------------ placement
    def place(self) -> None:
        check_fits(self.groups, self.ray.cluster_resources(), self.ray.nodes())
        end = time.monotonic() + self.spec.placement_timeout_s
        servers, trainer = self.groups
        # the trainer first: its nodes must be distinct, which servers packed first could make impossible
        trainer_pg = reserve(self.ray, trainer, self.spec.placement_timeout_s)
        self.pgs = [trainer_pg]
        self.pgs.insert(0, reserve(self.ray, servers, max(1.0, end - time.monotonic()), holding=(trainer,)))
        log.info("placed: %s", "; ".join(f"{g.bundles} {g.name} bundle(s) x {g.per_bundle} {g.resource} "
                                           f"({g.strategy})" for g in self.groups))

    def _options(self, group: int, bundle: int, units: int) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpu = self.resource == "GPU"
        return {"num_gpus": units if gpu else 0, "num_cpus": 0 if gpu else units, "namespace": NAMESPACE,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pgs[group], bundle)}

    # ------------------------------------------------------------------------------ servers
    def _server_actor(self, s: _Server) -> Any:
        from agentflow.recipe._actors import ServerActor

        values = {"model": self.cfg.model.path, "gpus": self.groups[0].per_bundle, "api_key": self.key}
        opts = self._options(0, s.index, self.groups[0].per_bundle)
        return self.ray.remote(ServerActor).options(name=f"server-{s.index}", **opts).remote(
            s.index, self.spec.server_command, values)

    def start_servers(self) -> None:
        for s in self.servers:
            s.actor = self._server_actor(s)
        refs = [s.actor.start.remote(s.port, self.spec.startup_timeout_s) for s in self.servers]
        try:
            addresses = get_within(self.ray, refs, self.spec.startup_timeout_s + 60)
        except self.ray.exceptions.RayError as e:
            raise EngineError(f"an inference server did not start: {_cause(e)}") from None
        for s, address in zip(self.servers, addresses, strict=True):
            s.address, s.port = address, int(address.rsplit(":", 1)[1])
        log.info("servers ready: %s", ", ".join(f"server-{s.index} {s.address}" for s in self.servers))

    def _restart(self, s: _Server, why: str, waiting: dict[Any, tuple[str, int]]) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(s.actor, no_restart=True)
        if s.restarts >= self.spec.max_server_restarts:
            log.error("server-%d on %s %s and has used its %d restart(s) (launch.max_server_restarts); the run goes "
                      "on with the other servers", s.index, s.address, why, self.spec.max_server_restarts)
            return
        s.restarts += 1
        self.restarts += 1
        log.warning("server-%d on %s %s; restarting it (%d/%d)", s.index, s.address, why, s.restarts,
                    self.spec.max_server_restarts)
        s.actor = self._server_actor(s)
        waiting[s.actor.start.remote(s.port, self.spec.startup_timeout_s)] = ("started", s.index)

    def _back(self, s: _Server, address: str) -> None:
        if address == s.address:
            log.info("server-%d is back on %s; the trainer's server pool rejoins it with the current weights",
                     s.index, address)
            return
        log.error("server-%d came back on %s, not %s (its node was lost and Ray placed its bundle elsewhere); the "
                  "trainer knows only %s, so the run goes on without it", s.index, address, s.address, s.address)

    # ------------------------------------------------------------------------------ ranks
    def _trainer_config(self) -> str:
        inference = dataclasses.replace(self.cfg.inference, backend="remote", launch=None,  # the servers are ours
                                        addresses=tuple(s.address for s in self.servers),
                                        api_key="${oc.env:" + KEY_ENV + "}")
        logging_ = dataclasses.replace(self.cfg.logging, progress=False)  # a bar does not survive Ray's log stream
        cfg = dataclasses.replace(self.cfg, inference=inference, logging=logging_)
        return yaml.safe_dump(to_dict(cfg), sort_keys=False)

    def start_ranks(self, *, resume: bool, verbose: bool) -> None:
        from agentflow.recipe._actors import RankActor

        per = self.spec.ranks_per_node
        for r in range(self.world):
            opts = self._options(1, r // per, 1)
            self.ranks.append(self.ray.remote(RankActor).options(name=f"rank-{r}", **opts).remote(r, r % per,
                                                                                                   self.world))
        ends = self.ray.get([a.endpoint.remote(self.spec.master_port if r == 0 else 0)
                             for r, a in enumerate(self.ranks)])
        master = ends[0][:2]
        args = [*(["--resume"] if resume else []), *(["-v"] if verbose else [])]
        config = self._trainer_config()
        refs = []
        for r, a in enumerate(self.ranks):
            env = {KEY_ENV: self.key, "LOCAL_WORLD_SIZE": str(per)}
            if self.resource == "GPU":  # every rank of a node sees the node's GPUs and picks LOCAL_RANK's, as torchrun
                node = range(r - r % per, r - r % per + per)
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for i in node for g in ends[i][2])
            refs.append(a.start.remote(config, master, env, args))
        hosts = self.ray.get(refs)
        log.info("trainer: %d rank(s), MASTER_ADDR=%s MASTER_PORT=%d; %s", self.world, master[0], master[1],
                 ", ".join(f"rank-{r} on {h}" for r, h in enumerate(hosts)))

    # ------------------------------------------------------------------------------ watching
    def watch(self) -> None:
        """Until every rank exits: restart dead servers, stop the job when a rank fails."""
        waiting = self.waiting
        waiting |= {s.actor.watch.remote(): ("server", s.index) for s in self.servers}
        waiting |= {a.wait.remote(): ("rank", r) for r, a in enumerate(self.ranks)}
        ranks_left = self.world
        while ranks_left:
            [ref], _ = self.ray.wait(list(waiting), num_returns=1)
            kind, i = waiting.pop(ref)
            code, why = self._outcome(ref)
            if kind == "rank":
                if code:
                    self.stop_ranks()
                    raise EngineError(f"trainer rank {i} {why}; the job was stopped. {self.where()}")
                ranks_left -= 1
            elif kind == "started" and code == 0:
                self._back(self.servers[i], self.ray.get(ref))
                waiting[self.servers[i].actor.watch.remote()] = ("server", i)
            else:
                self._restart(self.servers[i], why, waiting)
        self._confirm_restarts(waiting)

    def _confirm_restarts(self, waiting: dict[Any, tuple[str, int]]) -> None:
        """The ranks are done: report restarts still under way. The trainer's pool may have seen a
        restarted server healthy, rejoined it and finished the run before the server's actor (which
        polls more slowly) confirmed the start; give each a few seconds to say so."""
        for ref, (kind, i) in list(waiting.items()):
            if kind != "started":
                continue
            ready, _ = self.ray.wait([ref], timeout=5.0)
            if ready and self._outcome(ref)[0] == 0:
                waiting.pop(ref)
                self._back(self.servers[i], self.ray.get(ref))
            else:
                log.warning("server-%d was still restarting when the run ended", i)

    def _outcome(self, ref: Any) -> tuple[int, str]:
        """(0, "") for a clean exit or a started server; else (code, what happened)."""
        try:
            value = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            return -1, f"died ({_cause(e)})"
        if isinstance(value, str):  # a started server's address
            return 0, ""
        return int(value), f"exited with code {value}"

    def where(self) -> str:
        latest = Checkpointer(pathlib.Path(self.cfg.logging.run_dir)).latest()
        if latest is None:
            return "No checkpoint was written; run the same launch again to start afresh."
        return f"Last complete checkpoint: {latest}; continue with the same launch and --resume."

    # ------------------------------------------------------------------------------ stopping
    def stop_ranks(self) -> None:
        """SIGTERM every rank (rank 0 checkpoints within ``trainer.stop_grace_s``), then SIGKILL."""
        grace = self.cfg.trainer.stop_grace_s + 5
        refs = [a.stop.remote(grace) for a in self.ranks]
        with contextlib.suppress(self.ray.exceptions.RayError):
            get_within(self.ray, refs, grace + 15)

    def teardown(self) -> None:
        stops = [s.actor.stop.remote(10.0) for s in self.servers if s.actor is not None]
        stops += [a.stop.remote(5.0) for a in self.ranks]  # exited already, or stopped now; removes its config file
        self._settle(stops, 30.0)
        for actor in [*self.ranks, *(s.actor for s in self.servers if s.actor is not None)]:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self._settle(list(self.waiting), 10.0)
        from ray.util.placement_group import remove_placement_group

        for pg in self.pgs:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)

    def _settle(self, refs: list[Any], timeout_s: float) -> None:
        """Wait for ``refs`` (at most ``timeout_s``) and collect their errors, so Ray does not print
        them as unhandled: a dead actor's answer is expected here."""
        if not refs:
            return
        for ref in wait_within(self.ray, refs, timeout_s):
            with contextlib.suppress(self.ray.exceptions.RayError):
                self.ray.get(ref)


def _cause(e: BaseException) -> str:
    """One line for a Ray error: what killed the actor, where Ray says so."""
    text = str(e)
    if "low on memory" in text or "out of memory issue" in text or "OutOfMemory" in type(e).__name__:
        return ("Ray's memory monitor killed it: the node ran low on memory; free memory on the node, or raise "
                "RAY_memory_usage_threshold when starting Ray")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = [ln for ln in lines if "exit detail" in ln.lower() or ln.startswith("The actor is dead because")]
    return (detail or lines or [type(e).__name__])[-1][:500]
