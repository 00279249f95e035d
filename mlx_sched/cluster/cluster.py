"""The global scheduler: many instances behind the API of one engine.

    cluster = Cluster.build(model, ServeConfig(...), ClusterConfig(num_instances=2))
    rid = cluster.add_request(prompt, SamplingParams(max_tokens=32))
    while cluster.has_work():
        for out in cluster.step():
            print(out.request_id, out.new_tokens)

A request is dispatched on arrival (`dispatch`: round robin, least loaded, or Llumnix's
freeness) to an instance; each `step()` steps every instance that has work (in process
one after another; with Ray, all at once), streams their tokens back, then advances the
KV moves in flight (`migration.Mover`): DistServe's hand-overs from prefill to decode
instances, and Llumnix's live migrations chosen by a `MigrationPolicy`.

An instance that dies (a killed actor, or `kill(i)` in process) loses nothing: each of
its unfinished requests is dispatched again, as its prompt plus the tokens it already
streamed (n = 1; its remaining tokens are the same, as sampling keys depend on seed and
position only), or from the start with its streamed tokens skipped (n > 1).

The class is assembled from parts: `faults.Recovery` (deaths, replacements),
`rebalance.Rebalancing` (when to migrate), `moves.Moving` (hand-overs, moves in flight)
and `records.Reports` (metrics, checks).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from mlx_sched.cluster.backends import ClusterError, InstanceDead, gather
from mlx_sched.cluster.config import ClusterConfig
from mlx_sched.cluster.dispatch import make_dispatch
from mlx_sched.cluster.faults import Recovery
from mlx_sched.cluster.instance import Load, Output
from mlx_sched.cluster.migration import MigrationPolicy, Move, Mover
from mlx_sched.cluster.moves import Moving
from mlx_sched.cluster.rebalance import Rebalancing
from mlx_sched.cluster.records import ClusterOutput, ClusterRequest, Reports
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.driving import Driving
from mlx_sched.serve.request import RequestError, SamplingParams, validate_prompt


class Cluster(Recovery, Rebalancing, Moving, Reports, Driving):
    def __init__(
        self,
        instances: list,
        cfg: ClusterConfig,
        serve: ServeConfig,
        vocab_size: int,
        max_len: int,
        clock: Callable[[], float] = time.time,
        replace: Callable[[int], object] | None = None,
        link_bytes_per_s: float | None = None,
    ):
        """`instances`: `LocalInstance`s or `RayInstance`s (see `build`); `replace(i)` makes
        a new instance for a dead one (cfg.on_death == "replace"); `link_bytes_per_s` models
        the KV link's speed instead of timing copies (a simulated cluster, `cluster.sim`)."""
        if len(instances) != cfg.num_instances:
            raise ClusterError(f"{len(instances)} instances for num_instances={cfg.num_instances}")
        self.instances, self.cfg, self.serve = list(instances), cfg, serve
        self.vocab_size, self.max_len = vocab_size, max_len
        self.clock = clock
        self._replace = replace
        self.roles = cfg.instance_roles
        self.dispatch = make_dispatch(cfg.dispatch, headroom_pages=cfg.headroom_pages)
        self.migration = (
            MigrationPolicy(
                cfg.migration_interval_s,
                cfg.migration_low,
                cfg.headroom_pages,
                cfg.migration_max_moves,
            )
            if cfg.migration
            else None
        )
        self.mover = Mover(self.instances, link_bytes_per_s, clock, self._reserved)
        self.requests: dict[str, ClusterRequest] = {}
        self._open: dict[str, ClusterRequest] = {}  # the unfinished ones
        self.loads: list[Load | None] = [None] * len(instances)
        self.busy = [False] * len(instances)  # has work, as of its last report
        self.dead: set[int] = set()
        self._pending_revival: set[int] = set()  # replacements still starting
        self.moves: dict[str, Move] = {}
        self._due: dict[str, ClusterRequest] = {}  # prefilled: to hand over to decode
        # instances whose step is under way (a simulated cluster's event loop, `sim`):
        # hand-overs and moves touch a source only between its steps
        self.in_flight: set[int] = set()
        self._has_decode = "decode" in self.roles
        self.move_log: list[dict] = []
        self.events: list[str] = []  # deaths, replacements, recoveries (logged too)
        self.compiles = [0] * len(instances)
        self._next_id = 0
        self._last_migration = -float("inf")
        for i, ld in enumerate(gather([inst.call("load") for inst in self.instances])):
            if isinstance(ld, BaseException):
                raise ClusterError(f"instance {i} did not start: {ld}")
            self.loads[i] = ld

    @classmethod
    def build(cls, model, serve: ServeConfig, cfg: ClusterConfig, mesh: dict | None = None):
        """Instances of `model` over disjoint device subsets (backend "local") or in Ray
        actors (backend "ray"), each with its own engine and warm-up."""
        from mlx_sched.cluster import build

        return build.build_cluster(model, serve, cfg, mesh or {})

    # -- requests -------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        client: str = "default",
        priority: int = 0,
        arrival: float | None = None,
        deadline: float | None = None,
    ) -> str:
        """Validate and dispatch a request; a RequestError (nothing queued) if invalid."""
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise RequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        tokens = validate_prompt(prompt, self.vocab_size, self.max_len, sampling.max_tokens)
        Z = self.serve.page_size
        need = -(-(len(tokens) + sampling.max_tokens) // Z) * sampling.n
        if need > self.serve.num_pages - 1:
            raise RequestError(
                f"request needs up to {need} KV pages but an instance has "
                f"{self.serve.num_pages - 1}; raise serve.num_pages or lower max_tokens / n"
            )
        if sampling.n > self.serve.max_seqs:
            raise RequestError(f"n={sampling.n} exceeds serve.max_seqs={self.serve.max_seqs}")
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self.requests:
            raise RequestError(f"request id '{request_id}' is already in use")
        now = self.clock() if arrival is None else arrival
        req = ClusterRequest(
            request_id,
            tokens,
            sampling,
            client,
            priority,
            now,
            deadline,
            outputs=[[] for _ in range(sampling.n)],
            times=[[] for _ in range(sampling.n)],
            finish_reasons=[None] * sampling.n,
            skip=[0] * sampling.n,
        )
        self._dispatch(req)
        self.requests[request_id] = req
        self._open[request_id] = req
        return request_id

    def _entry(self) -> list[int]:
        """Instances a new request may go to: the prefill (or colocated) ones that live."""
        alive = [i for i in range(len(self.instances)) if i not in self.dead]
        entry = [i for i in alive if self.roles[i] != "decode"]
        if not entry:  # no prefill instance left: decode instances serve whole requests
            entry = alive
        if not entry:
            raise ClusterError("every instance of the cluster is dead")
        return entry

    def _dispatch(self, req: ClusterRequest) -> None:
        """Send `req` (new, or recovered after a death) to an instance."""
        done = [len(o) for o in req.outputs]
        sampling, prompt = req.sampling, req.prompt
        if req.restarts and req.sampling.n == 1 and done[0]:
            # continue after what was streamed: same positions, so the same tokens follow
            prompt = req.prompt + req.outputs[0]
            sampling = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - done[0])
        elif req.restarts:
            req.skip = done  # from the start: drop what each sequence already streamed
        while True:
            entry = self._entry()
            pages = -(-len(prompt) // self.serve.page_size) * sampling.n
            pick = entry[self.dispatch.choose([self.loads[i] for i in entry], pages, req.priority)]
            (err,) = gather(
                [
                    self.instances[pick].call(
                        "add",
                        req.id,
                        prompt,
                        sampling,
                        req.client,
                        req.priority,
                        req.arrival,
                        req.deadline,
                    )
                ]
            )
            if isinstance(err, InstanceDead):
                self._on_death(pick, err)
                continue
            if isinstance(err, BaseException):
                raise err
            self.loads[pick].admit(pages)
            self.busy[pick] = True
            req.instance = pick
            req.phase = "decode" if self.roles[pick] == "decode" else "prefill"
            return

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            raise RequestError(f"unknown request id '{request_id}'")
        if req.finished:
            raise RequestError(f"request '{request_id}' already {req.status}")
        move = self.moves.pop(request_id, None)
        if move is not None:
            self.mover.abort(move, "the request was aborted")
            self.move_log.append(move.record())
        gather([self.instances[req.instance].call("abort", request_id)])
        req.finished, req.status = True, "aborted"
        self._open.pop(request_id, None)
        req.finish_reasons = [r or "abort" for r in req.finish_reasons]

    def has_work(self) -> bool:
        """Whether a request is unfinished (O(1): a request leaves `_open` as it finishes;
        one marked finished from outside leaves it here)."""
        open_ = self._open
        while open_:
            req = open_[next(iter(open_))]
            if not req.finished:
                return True
            del open_[req.id]
        return False

    # -- the loop -------------------------------------------------------------------------

    def step(self) -> list[ClusterOutput]:
        self._revive()
        stepping = [i for i, b in enumerate(self.busy) if b and i not in self.dead]
        reports = gather([self.instances[i].call("step") for i in stepping])
        new: dict[str, list[list[int]]] = {}
        for i, rep in zip(stepping, reports, strict=True):
            self.absorb(i, rep, new)
        self.coordinate()
        return [
            ClusterOutput(rid, toks, self.requests[rid].finished, self.requests[rid])
            for rid, toks in new.items()
        ]

    def absorb(self, i: int, rep, new: dict[str, list[list[int]]] | None = None) -> None:
        """Take instance i's step report (or the exception its step raised): its load, and
        its requests' new tokens (gathered per request into `new`)."""
        if isinstance(rep, InstanceDead):
            self._on_death(i, rep)
            return
        if isinstance(rep, BaseException):
            raise rep
        self.loads[i], self.busy[i], self.compiles[i] = rep.load, rep.has_work, rep.compiles
        now = rep.now
        for out in rep.outputs:
            self._take(i, out, now, new)

    def coordinate(self) -> None:
        """What the global scheduler does between steps: hand prefilled requests over to
        decode instances, advance the KV moves, and maybe start a migration."""
        self._handovers()
        self._advance_moves()
        self._maybe_migrate()

    def _take(self, i: int, out: Output, now: float, new) -> None:
        req = self.requests.get(out.request_id)
        if req is None or req.finished or req.instance != i:
            return  # aborted here, or a stale report of a request that moved
        got = None if new is None else new.setdefault(req.id, [[] for _ in req.outputs])
        skip = req.skip
        for j, toks in enumerate(out.new_tokens):
            if not toks:
                continue
            if skip[j]:
                drop = min(skip[j], len(toks))
                skip[j] -= drop
                toks = toks[drop:]
            req.outputs[j] += toks
            req.times[j] += [now] * len(toks)
            if got is not None:
                got[j] += toks
        req.preemptions = max(req.preemptions, out.preemptions)
        if self._has_decode and req.phase == "prefill" and req.outputs[0]:
            self._due[req.id] = req
        if out.finished:
            req.finished = True
            self._open.pop(req.id, None)
            req.status = "aborted" if out.error else "finished"
            req.error = out.error
            req.finish_reasons = list(out.finish_reasons)
            move = self.moves.pop(req.id, None)
            if move is not None:
                self.mover.abort(move, "the request finished on the source")
                self.move_log.append(move.record())

    # -- conveniences ---------------------------------------------------------------------

    def _done(self, request: ClusterRequest) -> bool:
        return request.finished

    def _final(self, request: ClusterRequest) -> ClusterOutput:
        return ClusterOutput(request.id, [], True, request)

    def shutdown(self) -> None:
        for inst in self.instances:
            close = getattr(inst, "close", None)
            if close is not None:
                close()
