"""Speculative decoding on the engine's multi-token decode steps.

A *drafter* proposes the next tokens of decoding sequences; the target model
verifies them in the ordinary mixed step, where a decoding sequence with k
drafts computes 1 + k positions (a declared `decode_widths` bucket) and
samples after each; `Engine._commit` (serve/postprocess.py) keeps the accepted drafts and the token
after them and rolls back the rest (pages past the kept tokens are released, and
nothing unverified enters the prefix cache).

- `drafters.PromptLookup`: no model; the continuation of the latest earlier
  match of the sequence's last n tokens (prompt + output).
- `drafters.DraftModel`: a smaller `models.Transformer` with the target's
  vocabulary, on its own K/V arrays that share the target's page tables, its
  proposals one jitted decode slice of up to gamma iterations.
- `speculator.Speculator`: the engine's side: how many drafts each decoding
  sequence gets before the policy schedules (placeholders, so every policy
  reserves pages for them and may drop them under memory pressure), the
  drafter's tokens after it, and the acceptance counts.
- `adaptive.AdaSpec` (`speculative.adaptive=True`): per-sequence confidences
  and, each step, the drafts per sequence (0 included) that maximise predicted
  goodput under step costs profiled at warm-up and learnt from measured steps.

The verify step decides acceptance on device (`acceptance.verify_chain`):
greedy rows accept while the target's argmax equals the draft; sampled rows
follow Leviathan et al.'s rejection rule with a draft model's distributions
(the target's distribution, exactly), or, with `acceptance="match"` and for
prompt lookup, accept while the draft equals the target's own per-position
sample (then the output is token for token the non-speculative output).
"""

from mlx_sched.speculative.config import SpecConfig

__all__ = ["SpecConfig"]
