"""Drafters: who proposes the next tokens of decoding sequences.

A drafter implements `propose(seqs, ks) -> list[list[int]]`: for each decoding
sequence (its last token not yet computed) up to `ks[i]` next tokens. It may
propose fewer, or none. The target verifies whatever is proposed, so a
drafter affects speed only, never the output.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.request import Seq, stop_ids
from models.errors import ConfigError


class Drafter:
    name = "base"
    catch_up_s = 0.0  # of the last proposal, seconds spent computing what it had not seen

    def propose(self, seqs: Sequence[Seq], ks: Sequence[int]) -> list[list[int]]:
        raise NotImplementedError

    def propose_tree(
        self, seqs: Sequence[Seq], budgets: Sequence[int], depths: Sequence[int], width: int
    ) -> list[tuple[list[int], list[int]]]:
        """Token trees: per sequence, at most budgets[i] draft nodes, depths[i] deep, up to
        `width` children per node on the main chain -> (node tokens, parents), where node c + 1
        holds tokens[c] and parents has one entry per node plus the root (parents[0] = -1,
        parents[c] < c; the main chain is nodes 1, 2, ... each the child of the one before)."""
        raise NotImplementedError

    def warmup(self, progress=None) -> int:
        """Compile what the drafter runs; returns the number of shapes (none: 0)."""
        return 0

    def settle(self, seq: Seq, before: int, drafts: list[int]) -> None:
        """After verification of `drafts` proposed when seq had `before` tokens."""

    @property
    def sizes(self) -> tuple[int, ...]:
        """Slot buckets of the drafter's proposals, where its cost steps (none: no buckets)."""
        return ()

    def profile(self) -> dict[tuple[int, int], float]:
        """Seconds of a proposal by (slot bucket, drafts), measured before serving ({}: none;
        the adaptive controller then learns them from the steps it sees)."""
        return {}

    def distributions(self) -> dict:
        """Per sequence id, the distributions the last proposal's drafts were drawn from
        ([drafts, V]; sampled sequences of a drafter that samples, for the rejection rule)."""
        return {}

    def forget(self, seq_id: str) -> None:
        """The sequence left the engine: drop what is kept for it."""


class PromptLookup(Drafter):
    """Prompt lookup decoding: the tokens that followed the latest earlier occurrence of the
    sequence's last n tokens (n from ngram_max down to ngram_min) in its prompt and output."""

    name = "prompt_lookup"

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def propose(self, seqs: Sequence[Seq], ks: Sequence[int]) -> list[list[int]]:
        pairs = zip(seqs, ks, strict=True)
        return [lookup(s.tokens, k, self.ngram_max, self.ngram_min) for s, k in pairs]

    def propose_tree(self, seqs, budgets, depths, width):
        """A trie of up to `width` different continuations (of the latest matches first),
        the latest match's continuation its main chain."""
        out = []
        for s, budget, depth in zip(seqs, budgets, depths, strict=True):
            conts = continuations(s.tokens, depth, width, self.ngram_max, self.ngram_min)
            out.append(trie(conts, budget))
        return out


def lookup(tokens: Sequence[int], k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """k tokens following the latest earlier match of tokens' last n tokens, for the longest
    n in [ngram_min, ngram_max] that matches; [] if none does. A continuation that reaches
    the end of the tokens goes on with its own proposals (the match repeats with period
    L - start - n), so a repeating tail still yields k drafts."""
    L = len(tokens)
    for n in range(min(ngram_max, L - 1), ngram_min - 1, -1):
        suffix = list(tokens[L - n :])
        for start in range(L - n - 1, -1, -1):  # latest first; the suffix itself excluded
            if tokens[start] == suffix[0] and list(tokens[start : start + n]) == suffix:
                out: list[int] = []
                for i in range(start + n, start + n + k):
                    out.append(tokens[i] if i < L else out[i - L])
                return out
    return []


def continuations(
    tokens: Sequence[int], k: int, width: int, ngram_max: int, ngram_min: int
) -> list[list[int]]:
    """Up to `width` different k-token continuations of earlier matches of the tokens' last n
    tokens: the longest n first, the latest match first (the first is `lookup`'s)."""
    L, out = len(tokens), []
    for n in range(min(ngram_max, L - 1), ngram_min - 1, -1):
        suffix = list(tokens[L - n :])
        for start in range(L - n - 1, -1, -1):
            if tokens[start] == suffix[0] and list(tokens[start : start + n]) == suffix:
                cont: list[int] = []
                for i in range(start + n, start + n + k):
                    cont.append(tokens[i] if i < L else cont[i - L])
                if cont not in out:
                    out.append(cont)
                    if len(out) == width:
                        return out
    return out


def trie(conts: Sequence[Sequence[int]], budget: int) -> tuple[list[int], list[int]]:
    """Merge continuations into a token tree of at most `budget` nodes -> (tokens, parents),
    the first continuation the main chain (nodes 1..), shared prefixes once."""
    tokens: list[int] = []
    parents = [-1]
    children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for cont in conts:
        node = 0
        for tok in cont:
            nxt = children.get((node, tok))
            if nxt is None:
                if len(tokens) == budget:
                    break
                tokens.append(tok)
                parents.append(node)
                nxt = children[node, tok] = len(tokens)
            node = nxt
    return tokens, parents


def _view(seq: Seq, num_computed: int) -> Seq:
    """seq as the draft model sees it: the target's tokens and pages (shared, not copied), the
    draft's own count of computed positions, no drafts."""
    return dataclasses.replace(seq, num_computed=num_computed, draft=[])


class DraftModel(Drafter):
    """A smaller Transformer with the target's vocabulary, proposing with its own `Runner`.

    Its K/V arrays share the target's page tables: position p of a sequence lives at the
    same (page, offset) in both, so the draft needs no page bookkeeping of its own. It keeps
    per sequence how many positions its arrays hold, and the page ids they were written to:
    a sequence whose pages changed (preempted and recomputed, swapped back into other pages,
    copied on write) is recomputed from the first changed page. Catching up is prefill rows
    of draft mixed steps; a proposal of k drafts is one decode slice of k + 1 iterations,
    writing into the pages the target reserved for its verification: the extra iteration
    writes the last draft's K/V (its token is dropped), so a verification that keeps every
    draft needs no catch-up step before the next proposal (a mixed step of the draft costs
    about as much as a whole proposal).
    """

    name = "draft_model"

    def __init__(self, model, target_cfg: ServeConfig, target_model_cfg, mesh=None):
        from mlx_sched.serve.runner import Runner

        if model.cfg.vocab_size != target_model_cfg.vocab_size:
            raise ConfigError(
                f"the draft model's vocabulary ({model.cfg.vocab_size} tokens) is not the "
                f"target's ({target_model_cfg.vocab_size})"
            )
        if model.cfg.max_seq_len < target_cfg.max_len(target_model_cfg.max_seq_len):
            raise ConfigError(
                f"the draft model's max_seq_len ({model.cfg.max_seq_len}) is shorter than the "
                f"target's context ({target_cfg.max_len(target_model_cfg.max_seq_len)})"
            )
        gamma = target_cfg.spec.gamma
        self.cfg = dataclasses.replace(
            target_cfg,
            decode_widths=(1,),
            slice_len=gamma + 1,
            max_prefill_rows=target_cfg.max_seqs,  # every sequence's catch-up in one step
            max_context=target_cfg.max_len(target_model_cfg.max_seq_len),
            speculative={},
            policy="fcfs",
            policy_args={},
        )
        spec = target_cfg.spec
        trees = spec.tree_width > 1  # siblings come from the draft's distribution, greedy too
        self.runner = Runner(model, self.cfg, mesh, draft_probs=spec.rejection or trees)
        self.runner.probs_always = trees
        self.rejection = spec.rejection
        self._probs: dict = {}  # seq id -> [drafts, V], for the rejection rule
        self._q: dict = {}  # seq id -> [drafts, V], every sequence (trees)
        self._written: dict = {}  # seq id -> leading drafts of the last proposal with K/V
        # per sequence: positions the draft's arrays hold, their pages, the request's
        # preemption count (a preempted sequence may get the same page ids back)
        self.computed: dict[str, tuple[int, tuple[int, ...], int]] = {}
        self.seconds = 0.0  # time spent drafting (catch-up and proposals)

    def warmup(self, progress=None) -> int:
        return self.runner.warmup(progress)

    def forget(self, seq_id: str) -> None:
        self.computed.pop(seq_id, None)
        self._written.pop(seq_id, None)

    def _valid(self, seq: Seq) -> int:
        """Positions of seq the draft's arrays hold: up to the first page that changed."""
        n, pages, preemptions = self.computed.get(seq.id, (0, (), 0))
        if preemptions != seq.request.preemptions:
            return 0
        Z = self.cfg.page_size
        for i, page in enumerate(pages):
            if i >= len(seq.pages) or seq.pages[i] != page:
                return min(n, i * Z)
        return min(n, len(seq.tokens) - 1)

    def propose(self, seqs: Sequence[Seq], ks: Sequence[int]) -> list[list[int]]:
        t0 = time.perf_counter()
        views = [_view(s, self._valid(s)) for s in seqs]
        self._catch_up(views)
        self.catch_up_s = time.perf_counter() - t0
        plan = StepPlan(as_slice=True)
        for v, k in zip(views, ks, strict=True):
            plan.add(v, k + 1)  # a decode from the last token: k drafts, then the last's K/V
        result = self.runner.run(plan)
        out, self._probs, self._q = [], {}, {}
        probs = result.probs or [None] * len(views)
        for v, k, samples, q in zip(views, ks, result.samples, probs, strict=True):
            drafts = list(samples[:k])
            stops = set(stop_ids(v, self.cfg.eos_token))
            written = len(drafts)
            for j, tok in enumerate(drafts):  # a slot stops at a stop token: nothing after,
                if tok in stops:  # and no K/V of it
                    del drafts[j + 1 :]
                    written = j
                    break
            out.append(drafts)
            self._written[v.id] = written
            if q is not None:
                self._q[v.id] = q[: len(drafts)]
                if self.rejection and v.request.sampling.temperature > 0:
                    self._probs[v.id] = q[: len(drafts)]
        self.seconds += time.perf_counter() - t0
        return out

    def distributions(self) -> dict:
        return self._probs

    def propose_tree(self, seqs, budgets, depths, width):
        """The main chain is the draft's proposal; each of its nodes gets width - 1 siblings:
        for a sampled sequence independent draws from the draft's distribution at their
        parent (SpecInfer's i.i.d. children, keyed by seed, sequence, position and rank), for
        a greedy one the draft's next most likely tokens. Siblings are leaves."""
        chains = self.propose(seqs, depths)
        out = []
        for s, budget, chain in zip(seqs, budgets, chains, strict=True):
            chain = chain[:budget]
            tokens, parents = list(chain), list(range(-1, len(chain)))
            q = self._q.get(s.id)
            node_q = list(q[: len(chain)]) if q is not None else []
            sp = s.request.sampling
            for d in range(len(chain)):  # siblings of the main node at depth d + 1
                if q is None or len(tokens) >= budget:
                    break
                qd = np.asarray(q[d], np.float64)
                n_sib = min(width - 1, budget - len(tokens))
                if sp.temperature > 0:
                    pos = len(s.tokens) + d  # the position the sibling would take
                    rng = np.random.default_rng([sp.seed, s.index, pos, 1])
                    sib = list(rng.choice(len(qd), size=n_sib, p=qd / qd.sum()))
                else:
                    order = np.argsort(-qd, kind="stable")
                    sib = [int(t) for t in order if t != chain[d]][:n_sib]
                tokens += [int(t) for t in sib]
                parents += [d] * len(sib)
                node_q += [q[d]] * len(sib)
            out.append((tokens, parents))
            if s.id in self._probs:
                self._probs[s.id] = np.stack(node_q) if node_q else np.zeros((0, 1), np.float32)
        return out

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.cfg.decode_sizes

    def profile(self) -> dict[tuple[int, int], float]:
        """A proposal of k drafts is one call of the draft's decode slice running k + 1
        iterations: a call's fixed cost a plus k + 1 times an iteration's b, from the slice
        timed with one iteration and with all of them (a call of one iteration alone, scaled
        by k + 1, counted the call's dispatch and transfers k + 1 times)."""
        from mlx_sched.serve.shapes import Shape

        S = self.cfg.slice_len
        shapes = [Shape("decode", D, S=S) for D in self.cfg.decode_sizes]
        one, full = self.runner.profile(shapes), self.runner.profile(shapes, iters=S)
        out = {}
        for sh in shapes:
            b = max(0.0, (full[sh] - one[sh]) / max(S - 1, 1))
            a = max(0.0, one[sh] - b)
            out.update({(sh.D, k): a + (k + 1) * b for k in range(1, S)})
        return out

    def settle(self, seq: Seq, before: int, drafts: list[int]) -> None:
        """After verification: the draft's arrays hold positions up to the last token (of the
        `before` tokens) plus the drafts the target kept (of those whose K/V it wrote)."""
        kept = 0
        written = self._written.pop(seq.id, 0)
        for j, tok in enumerate(drafts[:written]):
            if before + j < len(seq.tokens) and seq.tokens[before + j] == tok:
                kept += 1
            else:
                break
        self.computed[seq.id] = (before + kept, tuple(seq.pages), seq.request.preemptions)

    def _catch_up(self, views: list[Seq]) -> None:
        """Prefill rows until every view has computed all but its last token."""
        C = self.cfg.chunk_tokens
        while True:
            plan = StepPlan()
            budget = self.cfg.token_budget
            for v in views:
                todo = len(v.tokens) - 1 - v.num_computed
                if todo <= 0 or budget <= 0:
                    continue
                n = min(todo, C, budget)
                plan.add(v, n)
                budget -= n
            if not plan.work:
                return
            self.runner.run(plan)
            for v, n in plan.work:
                v.num_computed += n
