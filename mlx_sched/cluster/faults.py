"""Instances that die: recovery of their requests, and replacements (`Cluster`'s part).

An instance that dies (a killed actor, or `kill(i)` in process) loses nothing: each of its
unfinished requests is dispatched again (`Cluster._dispatch` resumes it from its streamed
tokens), moves from or to it are aborted, and the instance is replaced (`on_death=
"replace"`, with a backend that can start one) or its capacity removed, with a log line.
"""

from __future__ import annotations

import logging

from mlx_sched.cluster.backends import ClusterError


class Recovery:
    """The fault handling of `cluster.Cluster` (a mixin over its instances, requests, moves)."""

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
