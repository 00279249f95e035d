"""`StepPlan`: what one engine step does, as plain data a policy returns and the engine executes.

The work of a step is a list of `(seq, n)` entries: sequence `seq` computes
the n positions `[seq.num_computed, seq.num_computed + n)` of its tokens
(prompt, generated, then its unverified `draft` tokens). An entry that starts
at the sequence's last token (`seq.remaining == 1`) is a *decode*: it samples
a token after every position it computes, so with k draft tokens it computes
n = 1 + k positions and verifies the drafts in the same step. Any other entry
is a *prefill* chunk, which samples only after its last position (used when
the chunk reaches the end of the tokens). With `as_slice`, the decode entries
instead run n iterations one after another inside one jitted call, each
sampling the next token (slice-level batching; n = 1 is ORCA's iteration).

KV movement around the device step is data too; the engine executes it in
this order: `swap_out` reads pages to the host KV store, `swap_in` writes
pages from it, then the step copies `copies` (copy-on-write) and computes.
Between engines, KV moves between steps, not inside a plan: a request's pages
are read on one engine and written into pages reserved on another
(`serve.handoff`, driven by `mlx_sched.cluster`). No policy moves KV itself.
"""

from __future__ import annotations

import dataclasses

from mlx_sched.serve.request import Request, Seq


@dataclasses.dataclass(frozen=True)
class PageTransfer:
    """The KV of `pages` (in a sequence's order) moves between the device and the host store."""

    seq_id: str
    pages: tuple[int, ...]


@dataclasses.dataclass
class StepPlan:
    work: list[tuple[Seq, int]] = dataclasses.field(default_factory=list)
    as_slice: bool = False  # decode entries run n autoregressive iterations in one call
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (src, dst)
    swap_out: list[PageTransfer] = dataclasses.field(default_factory=list)
    swap_in: list[PageTransfer] = dataclasses.field(default_factory=list)
    pinned: list[int] = dataclasses.field(default_factory=list)  # copy sources held for the step
    # speculative decoding's rejection rule: per sequence id, the distributions its draft
    # tokens were drawn from ([drafts, V]; sampled sequences of a draft model only)
    draft_probs: dict = dataclasses.field(default_factory=dict)
    # token trees (SpecInfer): per sequence id, each node's parent (node 0, the last token:
    # -1; node c > 0 is draft c - 1); absent: a chain
    draft_tree: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self._index()

    def _index(self) -> None:
        """Sequence ids in the plan, and how many entries decode (kept as entries come and go:
        the scheduler asks for both once per sequence it considers)."""
        if not self.work:  # a new plan, mostly: nothing to count
            self._ids, self.num_decodes = set(), 0
            return
        self._ids = {s.id for s, _ in self.work}
        self.num_decodes = sum(s.remaining == 1 for s, _ in self.work)

    # -- views ---------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return not (self.work or self.swap_out or self.swap_in)

    @property
    def decodes(self) -> list[tuple[Seq, int]]:
        return [(s, n) for s, n in self.work if s.remaining == 1]

    @property
    def prefills(self) -> list[tuple[Seq, int]]:
        return [(s, n) for s, n in self.work if s.remaining != 1]

    def split(self) -> tuple[list[tuple[Seq, int]], list[tuple[Seq, int]]]:
        """(decodes, prefills) in one pass."""
        decodes, prefills = [], []
        for entry in self.work:
            seq = entry[0]
            (decodes if len(seq.tokens) - seq.num_computed == 1 else prefills).append(entry)
        return decodes, prefills

    @property
    def tokens(self) -> int:
        """Positions computed this step (a slice counts its iterations)."""
        return sum(n for _, n in self.work)

    @property
    def num_prefills(self) -> int:
        return len(self.work) - self.num_decodes

    def has(self, seq: Seq) -> bool:
        return seq.id in self._ids

    def requests(self) -> list[Request]:
        """Requests with work in this plan, each once, in plan order."""
        seen: dict[str, Request] = {}
        for s, _ in self.work:
            seen.setdefault(s.request.id, s.request)
        return list(seen.values())

    # -- edits ---------------------------------------------------------------------

    def add(self, seq: Seq, n: int) -> None:
        if n < 1:
            raise ValueError(f"a plan entry computes at least one position, got {n}")
        sid = seq.id
        if sid in self._ids:
            raise ValueError(f"sequence {sid} is already in the plan")
        self.work.append((seq, n))
        self._ids.add(sid)
        self.num_decodes += len(seq.tokens) - seq.num_computed == 1  # remaining == 1

    def drop_request(self, req: Request) -> None:
        """Forget the work of `req` (it was preempted while the plan was being built)."""
        self.work[:] = [(s, n) for s, n in self.work if s.request is not req]
        self._index()
