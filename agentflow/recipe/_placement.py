"""Where ``agentflow launch`` puts its actors: two Ray placement groups, checked before they are asked for.

:func:`plan` turns the ``launch`` section into two :class:`Group`\\ s: the servers (one bundle per
server with its GPUs, ``PACK`` or ``SPREAD``) and the trainer (one bundle per trainer node holding
that node's ranks, ``STRICT_SPREAD`` over distinct nodes). :func:`check_fits` compares the request
with the cluster's totals and nodes and fails at once, naming both, when it can never fit;
:func:`reserve` asks Ray and waits at most the placement timeout (resources held by other jobs),
then fails naming what is free now. No placement waits silently.

Not here: what runs in the bundles (:mod:`agentflow.recipe._actors`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from agentflow.errors import ConfigError
from agentflow.recipe.config import LaunchSpec

__all__ = ["Group", "check_fits", "get_within", "plan", "reserve", "resource_of", "wait_within"]


@dataclass(frozen=True, slots=True)
class Group:
    """One placement group: ``bundles`` bundles of ``per_bundle`` units of ``resource``."""

    name: str
    resource: str  # "GPU" or "CPU"
    per_bundle: int
    bundles: int
    strategy: str

    @property
    def total(self) -> int:
        return self.per_bundle * self.bundles

    def bundle_list(self) -> list[dict[str, float]]:
        return [{self.resource: float(self.per_bundle)} for _ in range(self.bundles)]


def resource_of(spec: LaunchSpec, cluster: dict[str, float]) -> str:
    """``GPU`` or ``CPU``: what each server and rank asks Ray for (``launch.device``)."""
    if spec.device == "auto":
        return "GPU" if cluster.get("GPU", 0) > 0 else "CPU"
    return spec.device.upper()


def plan(spec: LaunchSpec, resource: str) -> tuple[Group, Group]:
    """(servers, trainer): a CPU server takes one CPU whatever ``gpus_per_server`` says."""
    per_server = spec.gpus_per_server if resource == "GPU" else 1
    servers = Group("servers", resource, per_server, spec.servers, "SPREAD" if spec.placement == "spread" else "PACK")
    trainer = Group("trainer", resource, spec.ranks_per_node, spec.nodes,
                    "STRICT_SPREAD" if spec.nodes > 1 else "PACK")
    return servers, trainer


def _asked(groups: tuple[Group, ...]) -> str:
    parts = [f"{g.bundles} {g.name} bundle(s) x {g.per_bundle} {g.resource}" for g in groups]
    return f"{' + '.join(parts)} = {sum(g.total for g in groups)} {groups[0].resource}"


def _nodes_line(resource: str, nodes: list[dict[str, Any]]) -> str:
    alive = [n for n in nodes if n.get("Alive", True)]
    each = ", ".join(f"{n.get('NodeManagerAddress', '?')}: {n.get('Resources', {}).get(resource, 0):g}" for n in alive)
    return f"{len(alive)} node(s) ({each})"


def check_fits(groups: tuple[Group, ...], cluster: dict[str, float], nodes: list[dict[str, Any]]) -> None:
    """Raise :class:`ConfigError` naming the request and the cluster when it can never be placed."""
    resource = groups[0].resource
    have = cluster.get(resource, 0.0)
    sizes = sorted((n.get("Resources", {}).get(resource, 0.0) for n in nodes if n.get("Alive", True)), reverse=True)
    problems = []
    if sum(g.total for g in groups) > have:
        problems.append(f"more {resource}s than the cluster has")
    for g in groups:
        fitting = sum(1 for s in sizes if s >= g.per_bundle)
        if g.strategy == "STRICT_SPREAD" and fitting < g.bundles:
            problems.append(f"{g.bundles} trainer nodes with {g.per_bundle} {resource} each, and only {fitting} "
                            "node(s) have that many")
        elif fitting == 0:
            problems.append(f"a {g.name} bundle needs {g.per_bundle} {resource} on one node, and no node has that many")
    if problems:
        raise ConfigError(f"launch cannot be placed: it asks for {_asked(groups)}; the cluster has {have:g} "
                          f"{resource} on {_nodes_line(resource, nodes)}: {'; '.join(problems)}. Lower launch.servers, "
                          "launch.gpus_per_server, launch.nodes or launch.ranks_per_node, or add nodes"
                          + (" (launch.device=cpu runs on CPUs)" if resource == "GPU" else ""))


def reserve(ray: Any, group: Group, timeout_s: float, holding: tuple[Group, ...] = ()) -> Any:
    """Create ``group``'s placement group and wait until it is placed, at most ``timeout_s``
    (``holding``: groups this launch placed already, named in the error)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(group.bundle_list(), strategy=group.strategy, name=f"agentflow-{group.name}")
    try:
        get_within(ray, [pg.ready()], timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        free = ray.available_resources().get(group.resource, 0.0)
        held = f" (this launch holds {_asked(holding)} already)" if holding else ""
        raise ConfigError(f"launch could not place the {group.name} within {timeout_s:.0f} s "
                          f"(launch.placement_timeout_s): it asks for {_asked((group,))} ({group.strategy}); "
                          f"{free:g} {group.resource} are free now{held} of "
                          f"{ray.cluster_resources().get(group.resource, 0.0):g} on "
                          f"{_nodes_line(group.resource, ray.nodes())}. Wait for other jobs to finish, or ask for "
                          "less") from None
    return pg


def wait_within(ray: Any, refs: list[Any], timeout_s: float) -> list[Any]:
    """The refs of ``refs`` that are ready within ``timeout_s``. Ray's ``get`` and ``wait`` with a
    timeout hold off Ctrl-C until they return (Ray 2.60), so this waits in slices of at most one
    second and Python handles the signal between them."""
    end = time.monotonic() + timeout_s
    pending = list(refs)
    while pending and (left := end - time.monotonic()) > 0:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(1.0, left))
    waiting = {r.hex() for r in pending}
    return [r for r in refs if r.hex() not in waiting]


def get_within(ray: Any, refs: list[Any], timeout_s: float) -> list[Any]:
    """``ray.get(refs, timeout=timeout_s)`` that a Ctrl-C interrupts (:func:`wait_within`)."""
    if len(wait_within(ray, refs, timeout_s)) < len(refs):
        raise ray.exceptions.GetTimeoutError(f"not ready within {timeout_s:g} s")
    return list(ray.get(refs))
