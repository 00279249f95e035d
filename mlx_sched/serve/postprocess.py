"""The engine's postprocess: a device step's sampled tokens entering the sequences.

`_commit` is the one place a step's results enter a sequence (accepted tokens, stop and
length limits, `num_computed`, pages released past the kept tokens, the prefix cache's full
pages); `_postprocess` commits every entry of a plan, forks parallel samples, finishes and
retires requests, and makes the step's `RequestOutput`s. A mixin of `serve.engine.Engine`
(it uses the engine's scheduler, policy, config and callbacks).
"""

from __future__ import annotations

from mlx_sched.serve.interface import StepResult
from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.policies import Policy
from mlx_sched.serve.request import Request, RequestOutput, Seq, Status, stop_ids

_ALL = object()  # `_commit`'s default hook: the policy's own


class Postprocess:
    def _postprocess(self, plan: StepPlan, result: StepResult, spec=None) -> list[RequestOutput]:
        now = self.clock()
        new: dict[Seq, list[int]] = {}  # this step's new tokens per sequence
        logps = result.logprobs or [None] * len(plan.work)
        commit, sequential = self._commit, plan.as_slice
        on_tokens = self.policy.on_tokens
        if getattr(on_tokens, "__func__", None) is Policy.on_tokens:
            on_tokens = None  # the base hook does nothing: skip the call per sequence
        for (seq, n), samples, lp in zip(plan.work, result.samples, logps, strict=True):
            commit(seq, n, samples, lp, sequential, new, now, on_tokens)
        if spec is not None:  # acceptance counts, before finished requests are retired
            self.spec.observe(spec)
        outputs = []
        for req in plan.requests():
            if req.status is not Status.RUNNING:
                continue
            if req.sampling.n > 1 and self.sched.needs_fork(req):
                self.sched.fork(req)
            seqs = req.seqs
            if seqs[0].done if len(seqs) == 1 else all([s.done for s in seqs]):
                self._finish(req, now)
            out = self._output(req, new)
            if out is not None:
                outputs.append(out)
            if req.status is Status.FINISHED:
                self._retire(req)
        return outputs

    def _commit(
        self, seq: Seq, n: int, samples, logps, sequential: bool, new, now, on_tokens=_ALL
    ) -> None:
        """The one place a step's results enter a sequence: accept its sampled tokens, append
        them up to a stop condition, advance num_computed, and release what was not kept.

        The entry computed n positions from p = num_computed. In a slice every sample is the
        next token. Otherwise sample j was drawn after position q = p + n - len(samples) + j;
        it is a new token when q >= len(tokens) - 1. A verifying decode's samples are its
        accepted drafts and one more token (the step decided on device and moved a tree's
        accepted nodes' K/V to their positions, `speculative.acceptance`). Positions
        computed past the kept tokens (rejected drafts) are overwritten later; their pages
        are released now and never enter the prefix cache. `on_tokens`: the policy's hook
        (None: a no-op, not called).
        """
        req = seq.request
        tokens = seq.tokens
        p0, L0 = seq.num_computed, len(tokens)
        # samples j0, j0 + 1, ... are new tokens: in a slice all of them; otherwise a decode
        # keeps all its samples (the accepted drafts, chain or tree path, and the token after
        # them) and a prefill chunk's sample is new only after the last token
        num_samples = len(samples)
        j0 = 0 if sequential else max(0, L0 - 1 - (p0 + n - num_samples))
        # keep tokens up to the length limit (the first one always) or a stop token, checked
        # in that order on each token: a stop token at the limit stops
        k, reason = max(0, num_samples - j0), None
        room = len(req.prompt) + req.sampling.max_tokens - L0
        if room < 1:
            room = 1
        if k >= room:
            k, reason = room, "length"
        stops = self._stops.get(req.id)
        if stops is None:
            stops = self._stop_set(seq)
        kept = samples[j0 : j0 + k] if k > 0 else []
        if stops and not stops.isdisjoint(kept):
            k, reason = next(i for i, t in enumerate(samples[j0:]) if t in stops) + 1, "stop"
            kept = kept[:k]
        appended = new.get(seq)
        if appended is None:
            appended = new[seq] = kept
        elif k:
            appended.extend(kept)
        if k:
            tokens.extend(kept)
            seq.token_times.extend([now] * k)
            if logps is not None and req.sampling.logprobs:
                seq.logprobs.extend(logps[j0 : j0 + k])
            if reason is not None:
                seq.done, seq.finish_reason = True, reason
        taken = num_samples > j0
        computed = num_samples if sequential else n
        seq.num_computed = min(p0 + computed, len(tokens) - 1 if taken else p0 + computed)
        if seq.draft:
            seq.draft = []
        sched = self.sched
        if self.cfg.prefix_caching and len(seq.page_hashes) < (
            min(seq.num_computed, len(tokens)) // self.cfg.page_size
        ):
            sched.register_full_pages(seq)
        if seq.done:
            sched.free_seq(seq)
        elif len(seq.pages) > -(-seq.num_computed // self.cfg.page_size):
            sched.trim(seq)
        if taken:
            if on_tokens is _ALL:
                on_tokens = self.policy.on_tokens
            if on_tokens is not None:
                on_tokens(req, len(appended), now)

    def _stop_set(self, seq: Seq) -> frozenset[int]:
        stops = self._stops.get(seq.request.id)
        if stops is None:
            stops = self._stops[seq.request.id] = frozenset(stop_ids(seq, self.cfg.eos_token))
        return stops

    def _finish(self, req: Request, now: float) -> None:
        self._stops.pop(req.id, None)
        req.status, req.finished_at = Status.FINISHED, now
        self.sched.running.remove(req)
        self.policy.on_finish(req, now)

    def _output(self, req: Request, new) -> RequestOutput | None:
        seqs = req.seqs
        if len(seqs) == 1:
            t = new.get(seqs[0])
            finished = req.is_finished
            if not finished and not t:
                return None
            toks = [t if t is not None else []]
        else:
            toks = [new.get(s, []) for s in seqs]
            finished = req.is_finished
            if not finished and not any(toks):
                return None
        out = RequestOutput(req.id, toks, finished, req)
        cb = self._callbacks.get(req.id)
        if cb is not None:
            cb(out)  # may abort this request or others: abort drops their callbacks
            if req.is_finished:
                self._callbacks.pop(req.id, None)
        return out
