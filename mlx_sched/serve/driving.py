"""The offline conveniences over `add_request` / `step`, shared by one engine and a cluster.

A class using `Driving` has `add_request(prompt, sampling) -> id`, `step() -> outputs`
(each with `request_id` and `new_tokens`), a `requests` mapping, and says when a request
is done (`_done`) and what `generate` returns for it (`_final`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from mlx_sched.serve.request import SamplingParams


class Driving:
    def _done(self, request) -> bool:
        raise NotImplementedError

    def _final(self, request):
        raise NotImplementedError

    def stream(self, request_id: str) -> Iterator[list[list[int]]]:
        """Step until `request_id` finishes, yielding its new tokens (per sequence) per step."""
        req = self.requests[request_id]
        while not self._done(req):
            for out in self.step():
                if out.request_id == request_id and any(out.new_tokens):
                    yield out.new_tokens

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list:
        """Offline: run every prompt to completion; outputs in prompt order (one
        `SamplingParams` for all, or one per prompt)."""
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, s) for p, s in zip(prompts, sampling, strict=True)]
        reqs = [self.requests[i] for i in ids]
        while any(not self._done(r) for r in reqs):
            self.step()
        return [self._final(r) for r in reqs]
