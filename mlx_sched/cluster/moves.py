"""KV moves between instances (`Cluster`'s part): DistServe's hand-overs of prefilled
requests to decode instances, the start of a move (a hand-over or a Llumnix migration), and
the advance of the moves in flight between steps (`migration.Mover` copies the pages).
"""

from __future__ import annotations

from mlx_sched.cluster.backends import gather
from mlx_sched.cluster.migration import Move
from mlx_sched.cluster.records import ClusterRequest


class Moving:
    """The KV moves of `cluster.Cluster` (a mixin over its instances, requests, loads, moves)."""

    def _reserved(self, dst: int, pages: int) -> None:
        """A move reserved `pages` on `dst`: its free pages are that much lower until it next
        reports (dispatch and migration choices read the lower figure)."""
        load = self.loads[dst]
        if load is not None:
            load.free_pages = max(0, load.free_pages - pages)

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
