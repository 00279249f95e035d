"""AdaSpec: per-step speculation lengths chosen to maximise predicted goodput.

Each decoding sequence i carries a confidence c_i, a running mean of its drafts' acceptance
(it starts at 0.6 and moves by `BETA` per verified draft position: 1 for an accepted draft,
0 for the first rejected one). If the m most confident sequences of a batch of B get k drafts
each, the step is expected to give

    tokens(k, m) = B + sum_{i <= m} sum_{j = 1..k} c_i^j

and to cost T_verify(B, k + 1) + T_draft(m, k) seconds (a verify step of width k + 1, and
the drafter's proposal of k tokens for m sequences); without speculation (k = 0) the batch
decodes one token per sequence per decode-slice iteration, T_decode(B). The controller
picks the (k, m) of largest tokens / seconds over the compiled widths (k = width - 1, 0
included) and m over every count, so under load, where the verify step's cost grows with
B (k + 1), speculation shrinks or stops.

The step times come from `StepCosts`: profiled at warm-up (each compiled shape run once
with padding slots) and then the median of the engine's latest measured steps of each kind
and shape (step times here have heavy tails: with a running mean, a few 2x-slow steps kept
a shape's cost high for many steps, and the controller stopped speculating where a chain of
8 ran 1.5x faster than no speculation).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from mlx_sched.serve.shapes import bucket

START = 0.6  # a new sequence's confidence (AdaSpec's initial acceptance estimate)
BETA = 0.2  # weight of each new observation in a confidence's running mean


@dataclasses.dataclass
class StepCosts:
    """Device and host seconds per step kind, by compiled bucket: profiled, then the median of
    the latest `window` measured steps."""

    decode_sizes: tuple[int, ...]  # decode-slice slot buckets
    verify_sizes: tuple[int, ...]  # mixed-step slot buckets
    draft_sizes: tuple[int, ...] = ()  # the drafter's slot buckets (none: one cost for any)
    window: int = 15
    learn: bool = True  # False: the tables stay as set (profiled, or by hand)
    decode: dict = dataclasses.field(default_factory=dict)  # D -> one slice iteration
    verify: dict = dataclasses.field(default_factory=dict)  # (D, L) -> a mixed step, no prefill
    draft: dict = dataclasses.field(default_factory=dict)  # (Dd, k) -> a proposal
    host: dict = dataclasses.field(default_factory=dict)  # step kind -> host seconds a step
    _seen: dict = dataclasses.field(default_factory=dict, repr=False)  # (table, key) -> deque

    def _mean(self, table: dict, key, seconds: float) -> None:
        """table[key] <- the median of its latest `window` measurements (the profiled value
        stands until the first)."""
        if not self.learn:
            return
        seen = self._seen.setdefault((id(table), key), collections.deque(maxlen=self.window))
        seen.append(seconds)
        table[key] = float(np.median(seen))

    def observe_step(self, rec) -> None:
        """A StepRecord: decode slices per iteration, mixed steps without prefill tokens."""
        if rec.kind == "decode" and rec.iters:
            self._mean(self.decode, rec.shape[0], rec.device_s / rec.iters)
            self._mean(self.host, "decode", rec.host_s)
        elif rec.kind == "mixed" and rec.shape[2] == 0 and rec.shape[0]:
            self._mean(self.verify, rec.shape[:2], rec.device_s)
            # the record's host time includes the drafter's, which is costed on its own
            self._mean(self.host, "mixed", rec.host_s - getattr(rec, "draft_s", 0.0))

    def _draft_key(self, m: int, k: int) -> tuple[int, int]:
        return (bucket(self.draft_sizes, m) if self.draft_sizes else 0), k

    def observe_draft(self, m: int, k: int, seconds: float) -> None:
        self._mean(self.draft, self._draft_key(m, k), seconds)

    # -- prediction ------------------------------------------------------------------

    @staticmethod
    def _lookup(table: dict, key, default: float) -> float:
        if key in table:
            return table[key]
        if not table:
            return default
        # nearest profiled entry, scaled linearly by the slot count (first key component)
        near = min(table, key=lambda k: abs(np.subtract(k, key)).sum())
        d0 = near[0] if isinstance(near, tuple) else near
        d1 = key[0] if isinstance(key, tuple) else key
        return table[near] * max(d1, 1) / max(d0, 1)

    def decode_time(self, B: int, slice_len: int) -> float:
        """Seconds per token-per-sequence without speculation: a slice iteration plus the host's
        share of its step."""
        D = bucket(self.decode_sizes, B)
        return self._lookup(self.decode, D, 1e-3) + self.host.get("decode", 0.0) / max(slice_len, 1)

    def verify_time(self, B: int, L: int) -> float:
        D = bucket(self.verify_sizes, B)
        return self._lookup(self.verify, (D, L), 1e-3 * L) + self.host.get("mixed", 0.0)

    def draft_time(self, m: int, k: int) -> float:
        if not m or not k:
            return 0.0
        return self._lookup(self.draft, self._draft_key(m, k), 0.0)


class AdaSpec:
    """Per-sequence confidences and the per-step choice of speculation lengths."""

    def __init__(self, widths: tuple[int, ...], gamma: int, costs: StepCosts, slice_len: int):
        self.ks = sorted({w - 1 for w in widths if w - 1 <= gamma} | {0})
        self.costs, self.slice_len = costs, slice_len
        self.confidence: dict[str, float] = collections.defaultdict(lambda: START)
        self.last: tuple[int, int] = (0, 0)  # the (k, m) chosen for the latest step

    def observe(self, seq_id: str, proposed: int, accepted: int) -> None:
        """A verification of `proposed` drafts of which the first `accepted` were kept."""
        c = self.confidence[seq_id]
        for _ in range(accepted):
            c += BETA * (1.0 - c)
        if accepted < proposed:
            c -= BETA * c
        self.confidence[seq_id] = c

    def forget(self, seq_id: str) -> None:
        self.confidence.pop(seq_id, None)

    def goodput(self, confidences: list[float], k: int, m: int) -> float:
        """Predicted tokens per second of a step where the m most confident of these
        sequences get k drafts each (k = 0 or m = 0: no speculation)."""
        B = len(confidences)
        if k == 0 or m == 0:
            return B / self.costs.decode_time(B, self.slice_len)
        c = np.sort(np.asarray(confidences, np.float64))[::-1][:m]
        expected = np.sum(c[:, None] ** np.arange(1, k + 1)[None, :])
        seconds = self.costs.verify_time(B, k + 1) + self.costs.draft_time(m, k)
        return (B + expected) / seconds

    def choose(self, seq_ids: list[str]) -> dict[str, int]:
        """Drafts per sequence for this step (0: none), maximising predicted goodput. Within
        one of the drafter's slot buckets the cost is the same for any count, so only each
        bucket's largest count (or B) is a candidate m. Runs every step: one sort and two
        cumulative sums, then a few scalar evaluations per candidate."""
        B = len(seq_ids)
        if not B:
            return {}
        conf = np.fromiter((self.confidence[i] for i in seq_ids), np.float64, B)
        order = np.argsort(-conf, kind="stable")
        kmax = self.ks[-1]
        # expected[k - 1, m - 1]: sum over the m most confident of sum_{j<=k} c^j
        powers = conf[order][None, :] ** np.arange(1, kmax + 1)[:, None] if kmax else None
        expected = np.cumsum(np.cumsum(powers, axis=0), axis=1) if kmax else None
        ms = sorted({min(size, B) for size in self.costs.draft_sizes} | {B})
        best, best_km = B / self.costs.decode_time(B, self.slice_len), (0, 0)
        for k in self.ks[1:]:
            verify = self.costs.verify_time(B, k + 1)
            for m in ms:
                g = (B + expected[k - 1, m - 1]) / (verify + self.costs.draft_time(m, k))
                if g > best:
                    best, best_km = g, (k, m)
        self.last = best_km
        k, m = best_km
        chosen = {seq_ids[i] for i in order[:m]}
        return {sid: (k if sid in chosen else 0) for sid in seq_ids}
