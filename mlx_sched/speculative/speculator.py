"""The engine's side of speculative decoding: drafts before and after the policy schedules,
and what verification kept."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.request import Seq
from mlx_sched.serve.shapes import Shape
from mlx_sched.speculative.adaptive import AdaSpec, StepCosts
from mlx_sched.speculative.drafters import Drafter, DraftModel, PromptLookup
from models.errors import ConfigError

PLACEHOLDER = -1  # a reserved draft slot, replaced by the drafter's token before the step


@dataclasses.dataclass
class SpecStats:
    """One step's speculation: drafts proposed and accepted, seconds spent drafting."""

    proposed: int = 0
    accepted: int = 0
    draft_s: float = 0.0

    def fields(self) -> dict:
        """As the fields of a `StepRecord`."""
        return dict(spec_proposed=self.proposed, spec_accepted=self.accepted, draft_s=self.draft_s)


def make_drafter(cfg: ServeConfig, model_cfg, draft_model=None, mesh=None) -> Drafter:
    spec = cfg.spec
    if spec.kind == "prompt_lookup":
        return PromptLookup(spec.ngram_max, spec.ngram_min)
    if draft_model is None:
        raise ConfigError(
            "serve.speculative.kind='draft_model' needs a draft model: pass draft_model= to "
            "the Engine (or set serve.speculative.draft_checkpoint in an entry point)"
        )
    return DraftModel(draft_model, cfg, model_cfg, mesh)


class Speculator:
    """Before the policy schedules, every decoding sequence gets `gamma` placeholder drafts
    (fewer near its max_tokens), so the policy reserves pages for their verification like
    any other positions, or drops them under memory pressure; after it, the drafter fills
    the scheduled ones (an entry shrinks when it proposes fewer) and the rest are cleared."""

    def __init__(self, cfg: ServeConfig, drafter: Drafter):
        self.cfg, self.drafter = cfg, drafter
        self.gamma, self.width = cfg.spec.gamma, cfg.spec.tree_width
        # (seq, tokens before, drafts, the drafts' main chain)
        self._pending: list[tuple[Seq, int, list[int], list[int]]] = []
        self.adaptive: AdaSpec | None = None  # AdaSpec's controller, when configured
        if cfg.spec.adaptive:
            costs = StepCosts(cfg.decode_sizes, cfg.mixed_decode_sizes, drafter.sizes)
            self.adaptive = AdaSpec(cfg.decode_widths, self.gamma, costs, cfg.slice_len)

    @classmethod
    def build(cls, cfg: ServeConfig, model_cfg, draft_model=None, mesh=None) -> Speculator:
        """The engine's speculator for `cfg.speculative` (a ConfigError if that is off but a
        draft model was given)."""
        if cfg.spec is None:
            raise ConfigError("a draft model was given but serve.speculative is off")
        return cls(cfg, make_drafter(cfg, model_cfg, draft_model, mesh))

    def warmup(self, runner=None) -> None:
        """Compile the drafter's shapes (a draft model's), logging progress; with AdaSpec,
        profile the target's decode and verify shapes (on `runner`) and the drafter's."""
        n = self.drafter.warmup(
            lambda i, n, shape: logging.info("draft warm-up %d/%d: %s", i + 1, n, shape)
        )
        if n:
            logging.info("draft warm-up compiled %d shapes", n)
        if self.adaptive is None or runner is None or not hasattr(runner, "profile"):
            return
        cfg, costs = self.cfg, self.adaptive.costs
        shapes = [Shape("decode", D, S=cfg.slice_len) for D in cfg.decode_sizes]
        shapes += [Shape("mixed", D, L, 0) for L in cfg.decode_widths[1:]
                   for D in cfg.mixed_decode_sizes]  # fmt: skip
        for shape, t in runner.profile(shapes).items():
            if shape.kind == "decode":
                costs.decode[shape.D] = t
            else:
                costs.verify[shape.D, shape.L] = t
        costs.draft.update(self.drafter.profile())
        logging.info("adaptive speculation: profiled %d target shapes", len(shapes))

    def length(self, seq: Seq) -> int:
        """Drafts for seq this step: gamma, but never past its max_tokens."""
        left = seq.request.sampling.max_tokens - seq.num_generated
        return max(0, min(self.gamma, left - 1))

    def prepare(self, running) -> None:
        decoding = [s for req in running for s in req.live_seqs if s.remaining == 1]
        if self.adaptive is not None:
            ks = self.adaptive.choose([s.id for s in decoding])
            for s in decoding:
                s.draft = [PLACEHOLDER] * min(ks[s.id], self.length(s))
            return
        for s in decoding:  # a tree reserves its nodes: width per level
            s.draft = [PLACEHOLDER] * (self.length(s) * self.width)

    def fill(self, plan: StepPlan, running) -> SpecStats:
        t0 = time.perf_counter()
        entries = [(i, s, n) for i, (s, n) in enumerate(plan.work) if s.remaining == 1 and n > 1]
        scheduled = {s.id for _, s, _ in entries}
        for req in running:  # placeholders of sequences the plan does not verify
            for s in req.seqs:
                if s.id not in scheduled:
                    s.draft = []
        self._pending = []
        if not entries:
            return SpecStats()
        seqs, budgets = [s for _, s, _ in entries], [n - 1 for _, _, n in entries]
        if self.width > 1:
            depths = [min(self.length(s), b) for s, b in zip(seqs, budgets, strict=True)]
            proposals = self.drafter.propose_tree(seqs, budgets, depths, self.width)
        else:
            proposals = [(d, None) for d in self.drafter.propose(seqs, budgets)]
        probs = self.drafter.distributions()
        for (i, s, n), (drafts, parents) in zip(entries, proposals, strict=True):
            drafts = list(drafts)[: n - 1]
            s.draft = drafts
            if s.id in probs:
                plan.draft_probs[s.id] = probs[s.id][: len(drafts)]
            main = drafts
            if parents is not None:
                plan.draft_tree[s.id] = np.asarray(parents[: 1 + len(drafts)], np.int32)
                m = 0  # the main chain: nodes 1, 2, ... each the child of the one before
                while m < len(drafts) and parents[m + 1] == m:
                    m += 1
                main = drafts[:m]
            plan.work[i] = (s, 1 + len(drafts))  # still a decode of seq: the index holds
            self._pending.append((s, len(s.tokens), drafts, main))
        stats = SpecStats(proposed=sum(len(d) for _, _, d, _ in self._pending),
                          draft_s=time.perf_counter() - t0)  # fmt: skip
        if self.adaptive is not None:
            k = max((len(d) for _, _, d, _ in self._pending), default=0)
            if k:  # a proposal's cost; catching up on a new prompt is paid once per request
                seconds = stats.draft_s - self.drafter.catch_up_s
                self.adaptive.costs.observe_draft(len(entries), k, seconds)
        return stats

    def observe(self, stats: SpecStats) -> SpecStats:
        """After the step: drafts the target kept, per sequence and in all."""
        for s, before, drafts, main in self._pending:
            if self.width > 1:  # a tree path: every token appended but the last was a draft
                kept = max(0, min(len(drafts), len(s.tokens) - before - 1))
            else:
                kept = 0
                for j, tok in enumerate(drafts):
                    if before + j < len(s.tokens) and s.tokens[before + j] == tok:
                        kept += 1
                    else:
                        break
            s.spec_proposed += len(drafts)
            s.spec_accepted += kept
            if self.adaptive is not None and drafts:
                self.adaptive.observe(s.id, len(drafts), kept)
            stats.accepted += kept
            self.drafter.settle(s, before, main)
        self._pending = []
        return stats

    def on_step(self, rec) -> None:
        """The engine's record of a step: AdaSpec's step times learn from it."""
        if self.adaptive is not None:
            self.adaptive.costs.observe_step(rec)

    def forget(self, req) -> None:
        """The request left the engine: its sequences' drafter state goes."""
        for s in req.seqs:
            self.drafter.forget(s.id)
            if self.adaptive is not None:
                self.adaptive.forget(s.id)
