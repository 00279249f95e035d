"""When to migrate: Llumnix's load-balancing choice, every `interval_s`, and the explicit
`migrate` call (`Cluster`'s part; `migration.MigrationPolicy` decides the pair and the
request, `migration.Mover` moves it)."""

from __future__ import annotations

from mlx_sched.cluster.backends import ClusterError, gather
from mlx_sched.serve.request import RequestError


class Rebalancing:
    """The migration triggers of `cluster.Cluster` (a mixin over its loads, moves, roles)."""

    def _maybe_migrate(self) -> None:
        if self.migration is None:
            return
        now = self.clock()
        if now - self._last_migration < self.migration.interval_s:
            return
        if sum(m.kind == "migration" for m in self.moves.values()) >= self.migration.max_moves:
            self._last_migration = now
            return
        busy = {m.src for m in self.moves.values()} | {m.dst for m in self.moves.values()}
        loads = [None if i in self.dead else ld for i, ld in enumerate(self.loads)]
        loads = [
            ld if self.roles[i] != "prefill" else None for i, ld in enumerate(loads)
        ]  # prefill instances hand over instead
        if self.migration.source(loads, busy) in self.in_flight:
            return  # it gives a request between its steps: at its next report
        self._last_migration = now

        def candidates(i):
            (out,) = gather([self.instances[i].call("running_requests")])
            if isinstance(out, BaseException):
                return []
            return [c for c in out if c[0] in self.requests and c[0] not in self.moves]

        pick = self.migration.pick(loads, busy, candidates)
        if pick is not None:
            src, dst, rid = pick
            self.migrate(rid, dst)

    def migrate(self, request_id: str, dst: int) -> None:
        """Start a live migration of a running request to instance `dst` (also the tests'
        and experiments' way to force one)."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            raise RequestError(f"request '{request_id}' is not running in the cluster")
        if not 0 <= dst < len(self.instances):
            raise ClusterError(f"no instance {dst}: the cluster has {len(self.instances)}")
        if dst in self.dead:
            raise ClusterError(f"instance {dst} is dead: nothing can migrate to it")
        if dst == req.instance:
            raise ClusterError(f"request '{request_id}' already runs on instance {dst}")
        if request_id in self.moves:
            raise ClusterError(f"request '{request_id}' is already moving")
        self._start_move(req, req.instance, dst, "migration")
