"""Batch building: a plan and its compiled shape -> the host's bundle of small arrays.

`BatchBuilder` is the `Runner`'s host side (it reads the runner's `cfg`, `model_cfg`,
page size `Z`, table width `W`, `repl` sharding and its speculation flags): decode slots,
prefill rows, sampling rows, copy-on-write pairs, a token tree's parents and depths, the
draft's distributions for the rejection rule.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.request import NUM_STOP_IDS, Seq, stop_ids
from mlx_sched.serve.shapes import Shape

PACK_MAX_BYTES = 1 << 16  # host arrays up to this size travel in the one packed buffer


@jax.tree_util.register_pytree_node_class
class Packed:
    """A step's bundle as one int32 buffer (every small 4-byte host array, bit for bit) plus
    the entries that travel on their own (arrays already on the device, large arrays, other
    dtypes). One explicit `device_put` of a dict costs per array (~50 us each here, ~0.6 ms
    for a decode step's twelve, half of a small model's step); of one buffer ~0.1 ms. The
    layout (names, shapes, dtypes, offsets) is the pytree's static part, so each compiled
    shape sees one layout; `unpack` rebuilds the dict inside the step with static slices.
    Where an entry travels depends only on its shape and dtype (a small device array is
    refused: it would give its shape a second layout)."""

    def __init__(self, flat, rest: dict, layout: tuple):
        self.flat, self.rest, self.layout = flat, rest, layout

    @staticmethod
    def _small(a) -> bool:
        """Whether an entry's shape and dtype make it one of the packed ones."""
        return a.dtype.itemsize == 4 and a.dtype.kind in "iuf" and a.nbytes <= PACK_MAX_BYTES

    @classmethod
    def pack(cls, bundle: dict) -> Packed:
        parts, layout, rest, offset = [], [], {}, 0
        for name in sorted(bundle):
            a = bundle[name]
            if isinstance(a, np.ndarray) and cls._small(a):
                parts.append(np.ascontiguousarray(a).view(np.int32).reshape(-1))
                layout.append((name, a.shape, a.dtype.str, offset))
                offset += a.size
            else:
                if isinstance(a, jax.Array) and cls._small(a):
                    raise ValueError(f"bundle entry {name!r}: a small device array; pass it "
                                     "from the host so that it travels packed")  # fmt: skip
                rest[name] = a
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return cls(flat, rest, tuple(layout))

    def unpack(self) -> dict:
        out = dict(self.rest)
        for name, shape, dtype, offset in self.layout:
            size = int(np.prod(shape, dtype=np.int64))
            piece = jax.lax.slice(self.flat, (offset,), (offset + size,)).reshape(shape)
            dtype = np.dtype(dtype)
            out[name] = piece if dtype == np.int32 else jax.lax.bitcast_convert_type(piece, dtype)
        return out

    def tree_flatten(self):
        names = tuple(sorted(self.rest))
        return (self.flat, *(self.rest[n] for n in names)), (self.layout, names)

    @classmethod
    def tree_unflatten(cls, aux, children):
        layout, names = aux
        return cls(children[0], dict(zip(names, children[1:], strict=True)), layout)


def unpacking(step):
    """`step(..., bundle)` taking a `Packed` bundle as its last argument (the runner's steps
    take nothing else)."""

    @functools.wraps(step)
    def run(*args, **kwargs):
        *head, b = args
        return step(*head, b.unpack(), **kwargs)

    return run


def depths(parent_L: np.ndarray) -> np.ndarray:
    """Depth of each node of a token tree given its parents (node 0, the root: depth 0)."""
    out = np.zeros(len(parent_L), np.int32)
    for c in range(1, len(parent_L)):
        out[c] = out[parent_L[c]] + 1 if parent_L[c] >= 0 else 0
    return out


class BatchBuilder:
    """Bundles of the runner's steps (mixed steps and decode slices)."""

    def _sampling_rows(self, seqs: list[Seq | None], positions: list[int]) -> dict:
        n = len(seqs)
        out = {
            "temperature": np.zeros(n, np.float32),
            "top_k": np.zeros(n, np.int32),
            "top_p": np.ones(n, np.float32),
            "seed": np.zeros(n, np.int32),
            "seq_index": np.zeros(n, np.int32),
            "sample_pos": np.asarray(positions, np.int32),
        }
        for i, s in enumerate(seqs):
            if s is None:
                continue
            sp = s.request.sampling
            out["temperature"][i] = sp.temperature
            out["top_k"][i] = sp.top_k
            out["top_p"][i] = sp.top_p
            out["seed"][i] = sp.seed
            out["seq_index"][i] = s.index
        return out

    def _copies(self, copies: list[tuple[int, int]]) -> dict:
        M = self.cfg.max_copies
        if len(copies) > M:
            raise ValueError(f"{len(copies)} page copies exceed max_copies={M}")
        src, dst = np.zeros(M, np.int32), np.zeros(M, np.int32)
        for i, (s, d) in enumerate(copies):
            src[i], dst[i] = s, d
        return {"copy_src": src, "copy_dst": dst}

    def _table(self, seqs: list[Seq], rows: int) -> np.ndarray:
        table = np.zeros((rows, self.W), np.int32)
        for i, s in enumerate(seqs):
            table[i, : len(s.pages)] = s.pages
        return table

    @staticmethod
    def _token_at(seq: Seq, p: int) -> int:
        n = len(seq.tokens)
        return seq.tokens[p] if p < n else seq.draft[p - n]

    def build_mixed(self, plan: StepPlan, shape: Shape) -> dict:
        """The bundle of a mixed step: decode slots (each its positions from num_computed), then
        prefill rows; sampling after every decode position and after each row's last token."""
        Z, C = self.Z, self.cfg.chunk_tokens
        D, L, Tp = shape.D, shape.L, shape.Tp
        R = self.cfg.max_prefill_rows if Tp else 0
        decodes, prefills = plan.decodes, plan.prefills
        dec = {k: np.zeros((D, L), np.int32) for k in ("tokens", "pos", "wpage", "woff")}
        dec_len, dec_ndraft = np.zeros(D, np.int32), np.zeros(D, np.int32)
        trees = self.trees and L > 1  # token trees: a parent per node, positions by depth
        parent = np.full((D, L), -1, np.int32)
        depth_of: dict[str, np.ndarray] = {}
        for i, (s, n) in enumerate(decodes):
            p0 = s.num_computed
            slots = np.arange(p0, p0 + n)  # where each node's K/V is written
            dec["tokens"][i, :n] = [self._token_at(s, p) for p in slots]
            if trees:
                parent[i, :n] = plan.draft_tree.get(s.id, np.arange(-1, n - 1))
                depth_of[s.id] = depths(parent[i, :n])
                dec["pos"][i, :n] = p0 + depth_of[s.id]
            else:
                dec["pos"][i, :n] = slots
            dec["wpage"][i, :n] = np.asarray(s.pages, np.int32)[slots // Z]
            dec["woff"][i, :n] = slots % Z
            dec_len[i], dec_ndraft[i] = p0 + n, n - 1
        pre = {k: np.zeros(Tp, np.int32) for k in ("tokens", "pos", "wpage", "woff")}
        pre_index = np.full((R, min(C, Tp)), Tp, np.int32)
        pre_len = np.zeros(R, np.int32)
        row_last = []
        off = 0
        for r, (s, n) in enumerate(prefills):
            p0 = s.num_computed
            sl, pos = slice(off, off + n), np.arange(p0, p0 + n)
            pre["tokens"][sl], pre["pos"][sl] = s.tokens[p0 : p0 + n], pos
            pre["wpage"][sl] = np.asarray(s.pages, np.int32)[pos // Z]
            pre["woff"][sl] = pos % Z
            pre_index[r, :n] = np.arange(off, off + n)
            pre_len[r] = p0 + n
            row_last.append(D * L + off + n - 1)
            off += n
        sample_index = np.zeros(D * L + R, np.int32)
        sample_index[: D * L] = np.arange(D * L)
        sample_index[D * L : D * L + len(row_last)] = row_last
        rows: list[Seq | None] = [None] * (D * L + R)
        positions = [0] * (D * L + R)
        for i, (s, n) in enumerate(decodes):
            for j in range(n):
                d = depth_of[s.id][j] if trees else j
                rows[i * L + j], positions[i * L + j] = s, s.num_computed + d + 1
        for r, (s, n) in enumerate(prefills):
            rows[D * L + r], positions[D * L + r] = s, s.num_computed + n
        return {
            **{f"dec_{k}": a for k, a in dec.items()},
            "dec_pages": self._table([s for s, _ in decodes], D),
            "dec_len": dec_len,
            "dec_ndraft": dec_ndraft,
            **{f"pre_{k}": a for k, a in pre.items()},
            "pre_index": pre_index,
            "pre_pages": self._table([s for s, _ in prefills], R),
            "pre_len": pre_len,
            "sample_index": sample_index,
            **self._sampling_rows(rows, positions),
            **self._copies(plan.copies),
            **self._draft_probs(plan, D, L),
            **({"dec_parent": parent, "dec_base": dec_len - dec_ndraft - 1} if trees else {}),
            **self._adapter_slots(decodes, prefills, D, R),
        }

    def _adapter_slots(self, decodes, prefills, D: int, R: int) -> dict:
        """Each decode slot's and prefill row's adapter slot (0: none) when the engine serves
        adapters (S-LoRA)."""
        if not self.cfg.lora:
            return {}
        dec, pre = np.zeros(D, np.int32), np.zeros(R, np.int32)
        for i, (s, _) in enumerate(decodes):
            dec[i] = s.request.adapter_slot
        for r, (s, _) in enumerate(prefills):
            pre[r] = s.request.adapter_slot
        return {"dec_slot": dec, "pre_slot": pre, **self.adapter_slots.tables()}

    def _draft_probs(self, plan: StepPlan, D: int, L: int) -> dict:
        """`dec_q` [D, L - 1, V]: each decode slot's draft distributions, for the rejection
        rule (only when this runner verifies by it, and in steps of L > 1)."""
        if not self.verify_probs or L == 1 or not D:
            return {}
        V = self.model_cfg.vocab_size
        given = [(i, plan.draft_probs.get(s.id)) for i, (s, _) in enumerate(plan.decodes)]
        given = [(i, q) for i, q in given if q is not None and len(q)]
        if not given:  # large zeros stay on the device; small ones travel in the packed buffer
            if (D, L) not in self._no_probs:
                zeros = np.zeros((D, L - 1, V), np.float32)
                big = zeros.nbytes > PACK_MAX_BYTES
                self._no_probs[D, L] = jax.device_put(zeros, self.repl) if big else zeros
            return {"dec_q": self._no_probs[D, L]}
        q = np.zeros((D, L - 1, V), np.float32)
        for i, probs in given:
            q[i, : len(probs)] = probs
        return {"dec_q": q}

    def build_slice(self, plan: StepPlan, shape: Shape) -> dict:
        D = shape.D
        tokens, positions = np.zeros(D, np.int32), np.zeros(D, np.int32)
        n_steps = np.zeros(D, np.int32)
        stops = np.full((D, NUM_STOP_IDS), -1, np.int32)
        for i, (s, n) in enumerate(plan.work):
            p = s.num_computed
            tokens[i], positions[i], n_steps[i] = s.tokens[p], p, n
            ids = stop_ids(s, self.cfg.eos_token)
            stops[i, : len(ids)] = ids
        rows: list[Seq | None] = [s for s, _ in plan.work] + [None] * (D - len(plan.work))
        bundle = {
            "tokens": tokens,
            "positions": positions,
            "pages": self._table([s for s, _ in plan.work], D),
            "steps": n_steps,
            "stop_ids": stops,
            **self._sampling_rows(rows, [0] * D),
            **self._copies(plan.copies),
        }
        if self.cfg.lora:  # each slot's adapter slot (S-LoRA)
            bundle["slot"] = np.asarray(
                [s.request.adapter_slot for s, _ in plan.work] + [0] * (D - len(plan.work)),
                np.int32,
            )
            bundle.update(self.adapter_slots.tables())
        del bundle["sample_pos"]  # the slice derives each iteration's position on device
        return bundle
