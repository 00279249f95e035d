"""Cluster configuration: how many instances, on which devices, with which roles and
policies, on which backend."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from models.errors import ConfigError, check_keys

ROLES = ("both", "prefill", "decode")
BACKENDS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    num_instances: int = 2
    devices_per_instance: int = 1  # local backend: each instance's sub-mesh
    # per instance: "both" (colocated), "prefill" or "decode" (DistServe); () = all "both"
    roles: tuple[str, ...] = ()
    dispatch: str = "llumnix"  # round_robin | least_loaded | llumnix
    headroom_pages: int = 0  # Llumnix: pages kept free per high-priority request
    migration: bool = False  # Llumnix's load-balancing live migration
    migration_interval_s: float = 0.05
    migration_low: float = 4.0  # freeness (pages per running sequence) that sheds load
    migration_max_moves: int = 1  # migrations in flight at once (each between its own pair)
    # a migration stops copying in the background after this many stages (a move's log
    # counts the final stop-and-copy stage as one more)...
    max_stages: int = 3
    last_stage_pages: int = 4  # ...or after a stage of at most this many pages
    chunk_pages: int = 16  # pages per KV read/write of a move (per cluster step)
    backend: str = "local"
    ray_address: str = ""  # "": a local Ray cluster started by ray.init()
    ray_timeout_s: float = 30.0  # joining a Ray cluster fails after this long
    on_death: str = "remove"  # a dead instance: "remove" its capacity, or "replace" it

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(f"cluster.{msg}")

        need(self.num_instances >= 1, f"num_instances must be >= 1, got {self.num_instances}")
        need(self.devices_per_instance >= 1, "devices_per_instance must be >= 1")
        need(
            not self.roles or len(self.roles) == self.num_instances,
            f"roles has {len(self.roles)} entries for {self.num_instances} instances",
        )
        bad = [r for r in self.roles if r not in ROLES]
        need(not bad, f"roles must be among {ROLES}, got {bad}")
        if self.roles and "decode" in self.roles:
            need("prefill" in self.roles or "both" in self.roles, "roles: nothing can prefill")
        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(self.on_death in ("remove", "replace"), "on_death must be 'remove' or 'replace'")
        need(self.migration_interval_s > 0, "migration_interval_s must be > 0")
        need(self.migration_max_moves >= 1, "migration_max_moves must be >= 1")
        need(self.max_stages >= 1 and self.last_stage_pages >= 1, "max_stages, last_stage_pages")
        need(self.chunk_pages >= 1, "chunk_pages must be >= 1")
        need(self.ray_timeout_s > 0, "ray_timeout_s must be > 0")

    @property
    def instance_roles(self) -> tuple[str, ...]:
        return self.roles or ("both",) * self.num_instances

    @property
    def disaggregated(self) -> bool:
        return "decode" in self.instance_roles

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterConfig:
        d = dict(d)
        check_keys(cls, d, "cluster config")
        if "roles" in d:
            d["roles"] = tuple(d["roles"])
        return cls(**d)

    def device_groups(self, num_devices: int) -> list[range]:
        """Each instance's device indices (local backend); a ConfigError if the layout does
        not divide the devices."""
        n, d = self.num_instances, self.devices_per_instance
        if n * d > num_devices:
            raise ConfigError(
                f"cluster: {n} instances x {d} devices need {n * d} devices but there are "
                f"{num_devices}; lower num_instances or devices_per_instance (or raise "
                "--xla_force_host_platform_device_count on a CPU)"
            )
        if num_devices % d:
            raise ConfigError(
                f"cluster: devices_per_instance={d} does not divide the {num_devices} devices"
            )
        return [range(i * d, (i + 1) * d) for i in range(n)]
