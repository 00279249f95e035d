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
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence

from mlx_sched.cluster.backends import ClusterError, InstanceDead, gather
from mlx_sched.cluster.config import ClusterConfig
from mlx_sched.cluster.dispatch import make_dispatch
from mlx_sched.cluster.instance import Load, Output
from mlx_sched.cluster.migration import MigrationPolicy, Move, Mover
from mlx_sched.cluster.records import ClusterOutput, ClusterRequest, pooled_itl
from mlx_sched.serve import metrics as metrics_lib
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.request import RequestError, SamplingParams, validate_prompt


class Cluster:
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
        self.mover = Mover(self.instances, link_bytes_per_s, clock)
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

    # -- disaggregation: prefill -> decode ------------------------------------------------

    def _handovers(self) -> None:
        if not self._due:
            return
        due, self._due = self._due, {}
        for req in due.values():
            if req.finished or req.phase != "prefill" or not req.outputs[0]:
                continue
            if req.instance in self.in_flight:
                self._due[req.id] = req
                continue
            if req.sampling.n != 1 or self.roles[req.instance] == "decode":
                req.phase = "decode"  # n > 1 requests decode where they were prefilled
                continue
            (err,) = gather([self.instances[req.instance].call("pause", req.id)])
            if isinstance(err, BaseException):
                self._due[req.id] = req  # not running now (preempted): try again later
                continue
            req.phase = "handover"
            self._start_move(req, req.instance, None, "handover")

    def _decode_target(self, req: ClusterRequest) -> int | None:
        live = [
            i
            for i in range(len(self.instances))
            if self.roles[i] == "decode" and i not in self.dead
        ]
        if not live:
            return None
        loads = [self.loads[i] for i in live]
        return live[max(range(len(live)), key=lambda k: (loads[k].freeness(), -k))]

    def _start_move(self, req: ClusterRequest, src: int, dst: int | None, kind: str) -> None:
        if dst is None:
            dst = self._decode_target(req)
        if dst is None:  # no decode instance left: decode where it was prefilled
            gather([self.instances[src].call("resume", req.id)])
            req.phase = "decode"
            return
        self.moves[req.id] = Move(
            req.id,
            src,
            dst,
            kind,
            req.preemptions,
            self.serve.page_size,
            self.cfg.chunk_pages,
            self.cfg.max_stages,
            self.cfg.last_stage_pages,
            started=self.clock(),
        )
        self.busy[dst] = True

    def _advance_moves(self) -> None:
        if not self.moves:
            return
        for rid, move in list(self.moves.items()):
            req = self.requests[rid]
            if move.src in self.dead or move.dst in self.dead:
                why = "the source died" if move.src in self.dead else "the destination died"
            elif move.src in self.in_flight:
                continue
            else:
                why = self.mover.advance(move)
            if why is None and move.outcome != "done":
                continue
            del self.moves[rid]
            if why is None:  # done: the request lives on the destination
                req.instance = move.dst
                req.migrations += move.kind == "migration"
                req.phase = "decode"
                self.busy[move.dst] = True
                self.loads[move.dst].running += 1
            else:
                if move.dst not in self.dead:
                    self.mover.abort(move, why)
                else:
                    move.outcome = f"aborted: {why}"
                if move.kind == "handover" and move.src not in self.dead and not req.finished:
                    req.phase = "prefill"  # paused on the source: hand over again next step
                    self._due[rid] = req
                    (paused,) = gather([self.instances[move.src].call("progress", rid)])
                    if not isinstance(paused, BaseException) and paused and paused[0] == "paused":
                        gather([self.instances[move.src].call("resume", rid)])
            self.move_log.append(move.record())

    # -- Llumnix: load-balancing migration -------------------------------------------------

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

    # -- faults ---------------------------------------------------------------------------

    def kill(self, i: int) -> None:
        """Fault injection: kill instance i (its requests are recovered at the next step)."""
        self.instances[i].kill()

    def _on_death(self, i: int, err: BaseException) -> None:
        if i in self.dead:
            return
        self.dead.add(i)
        self.loads[i], self.busy[i] = None, False
        lost = [r for r in self.requests.values() if not r.finished and r.instance == i]
        moved_here = [m for m in self.moves.values() if m.dst == i and m.kind == "migration"]
        self._log(
            f"instance {i} died ({err}); {len(lost)} requests recovered on the others"
            + (f", {len(moved_here)} migrations to it aborted" if moved_here else "")
        )
        for req in lost:
            move = self.moves.pop(req.id, None)
            if move is not None:
                if move.dst not in self.dead:
                    self.mover.abort(move, "the source died")
                move.outcome = "aborted: the source died"
                self.move_log.append(move.record())
            req.restarts += 1
            self._dispatch(req)
        if self.cfg.on_death == "replace" and self._replace is not None:
            self.instances[i] = self._replace(i)
            self.mover.instances = self.instances
            self._pending_revival.add(i)
            self._log(f"instance {i}: a replacement is starting")
        elif len(self.dead) == len(self.instances):
            raise ClusterError("every instance of the cluster is dead")
        else:
            self._log(f"instance {i}: its capacity is removed from the cluster")

    def _revive(self) -> None:
        for i in sorted(self._pending_revival):
            ready = self.instances[i].ready()
            if ready is None:
                continue
            self._pending_revival.discard(i)
            if isinstance(ready, BaseException):
                self._log(f"instance {i}: the replacement failed ({ready}); capacity removed")
                continue
            self.dead.discard(i)
            self.loads[i], self.busy[i] = ready, False
            self._log(f"instance {i}: the replacement joined")

    def _log(self, msg: str) -> None:
        logging.warning("cluster: %s", msg)
        self.events.append(msg)

    # -- conveniences ---------------------------------------------------------------------

    def stream(self, request_id: str) -> Iterator[list[list[int]]]:
        req = self.requests[request_id]
        while not req.finished:
            for out in self.step():
                if out.request_id == request_id and any(out.new_tokens):
                    yield out.new_tokens

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[ClusterOutput]:
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, s) for p, s in zip(prompts, sampling, strict=True)]
        while any(not self.requests[i].finished for i in ids):
            self.step()
        return [ClusterOutput(i, [], True, self.requests[i]) for i in ids]

    def request_metrics(self) -> list[dict]:
        return [r.metrics() for r in self.requests.values()]

    def summary(self, wall_s: float) -> dict:
        reqs = list(self.requests.values())
        metrics = [r.metrics(itl=False) for r in reqs]
        itl = pooled_itl(
            [r for r, m in zip(reqs, metrics, strict=True) if m["status"] == "finished"]
        )
        out = metrics_lib.summarize(metrics, [], wall_s, itl)
        moves = [m for m in self.move_log if m["outcome"] == "done"]
        migrations = [m for m in moves if m["kind"] == "migration"]
        out |= {
            "instances": len(self.instances),
            "dead": sorted(self.dead),
            "migrations": len(migrations),
            "migration_downtime": metrics_lib.percentiles([m["downtime"] for m in migrations]),
            "handovers": sum(m["kind"] == "handover" for m in moves),
            "moves_aborted": sum(m["outcome"].startswith("aborted") for m in self.move_log),
            "kv_bytes_moved": sum(m["bytes"] for m in self.move_log),
            "kv_seconds": sum(m["seconds"] for m in self.move_log),
            "compiles_after_warmup": list(self.compiles),
            "restarts": sum(r.restarts for r in self.requests.values()),
        }
        return out

    def check(self) -> None:
        """Every live instance's page pool is consistent (tests)."""
        live = [i for i in range(len(self.instances)) if i not in self.dead]
        for i, err in zip(
            live, gather([self.instances[i].call("check") for i in live]), strict=True
        ):
            if isinstance(err, BaseException):
                raise AssertionError(f"instance {i}: {err}")

    def shutdown(self) -> None:
        for inst in self.instances:
            close = getattr(inst, "close", None)
            if close is not None:
                close()
