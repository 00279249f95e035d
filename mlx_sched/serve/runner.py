"""The device runner: fixed-shape batches, the jitted steps, KV transfers, warm-up, compile counts.

Every step compiles for a shape from the finite set `shapes.all_shapes(cfg)`
(mixed steps `(D, L, Tp)`, decode slices `(D, S)`), and KV transfers for page
counts in powers of two (only with preemption="swap"). The page-table width
is fixed (pages for the longest allowed context); the context length is not a
bucket: paged attention's loop runs only over the chunks the longest context
in the batch needs. `warmup()` compiles every shape; afterwards
`compiles_since_warmup` must stay 0. Compilations are counted per runner, so
two engines in one process report their own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from mlx_sched.serve import steps
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.interface import StepResult
from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.request import NUM_STOP_IDS, Seq, stop_ids
from mlx_sched.serve.shapes import Shape, all_shapes, bucket, shape_for
from models import native_kernels, packed_matmul, pallas_attention
from models.config import DTYPES
from models.paged_attention import cache_layout
from models.paged_context import KernelOptions


class CompileCounter:
    """XLA backend compilations, counted per thread by a jax.monitoring listener; a runner adds
    up the ones that happen inside its own calls."""

    _local = threading.local()
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return

        def listener(event, duration, **kwargs):
            if event == "/jax/core/compile/backend_compile_duration":
                cls._local.count = cls.count() + 1

        jax.monitoring.register_event_duration_secs_listener(listener)
        cls._installed = True

    @classmethod
    def count(cls) -> int:
        return getattr(cls._local, "count", 0)


MANY_SHAPES = 100  # warm-up warns above this many programs


def depths(parent_L: np.ndarray) -> np.ndarray:
    """Depth of each node of a token tree given its parents (node 0, the root: depth 0)."""
    out = np.zeros(len(parent_L), np.int32)
    for c in range(1, len(parent_L)):
        out[c] = out[parent_L[c]] + 1 if parent_L[c] >= 0 else 0
    return out


class Runner:
    def __init__(
        self,
        model: nnx.Module,
        cfg: ServeConfig,
        mesh: jax.sharding.Mesh | None = None,
        draft_probs: bool = False,
    ):
        """`draft_probs`: a draft model's runner, whose decode slices also return each sampled
        token's distribution (`StepResult.probs`)."""
        CompileCounter.install()
        self.compiles = 0  # compilations inside this runner's calls
        self.compiles_at_warmup: int | None = None
        self.cfg, self.model_cfg = cfg, model.cfg
        self.mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
        self.max_len = cfg.max_len(model.cfg.max_seq_len)
        self.W = cfg.context_pages(model.cfg.max_seq_len)
        self.Z = cfg.page_size
        graphdef, params = nnx.split(model, nnx.Param)
        compute = model.cfg.compute_dtype
        if jnp.dtype(compute).itemsize < 4:  # serving keeps no f32 master copy: cast once, not
            params = jax.tree.map(lambda p: p.astype(compute), params)  # at every matmul
        self.param_shardings = sharding.state_shardings(self.mesh, params)
        self.params = sharding.place(params, self.param_shardings)
        mc = model.cfg
        last, storage = cache_layout(mc.head_dim, DTYPES[cfg.kv_dtype or mc.dtype])
        shape = (mc.n_layers, cfg.num_pages, self.Z, mc.n_kv_heads, last)
        self.kv_sharding = sharding.named_sharding(
            self.mesh, ("cache_layers", "cache_pages", "cache_page", "kv_heads", "head_dim"), shape
        )
        with self._counting():
            zeros = jax.jit(lambda: jnp.zeros(shape, storage), out_shardings=self.kv_sharding)
            self.k, self.v = zeros(), zeros()
        # kernels run on one device, the native one on a CPU, Pallas on a TPU or GPU (when the
        # cache meets its constraints, else a warning); sharded meshes use pure JAX
        single = cfg.native_kernels and self.mesh.size == 1
        native = single and native_kernels.available()
        kv_dtype = DTYPES[cfg.kv_dtype or mc.dtype]
        backend = jax.default_backend() if single else ""
        pallas = pallas_attention.flavour_for(backend, self.Z, mc.head_dim, kv_dtype)
        self.kernel = KernelOptions(cfg.attn_chunk_pages, native, pallas)
        repl = self.repl = sharding.replicated(self.mesh)
        with self._counting():
            self.tables = jax.jit(steps.pack_table, out_shardings=repl)(params["embed"][...])
            if (
                native and cfg.packed_matmuls and packed_matmul.available()
            ):  # dense projections on the native matmul
                tied = mc.tie_embeddings
                if tied and "embed_words" not in self.tables:  # lookups keep their own table
                    self.tables["embed_table"] = self.params["embed"][...]
                self.params = jax.jit(
                    functools.partial(packed_matmul.pack_params, tie_embeddings=tied),
                    out_shardings=repl,
                )(self.params)
                self.param_shardings = jax.tree.map(lambda _: repl, self.params)
        self.packed_matmuls = any(packed_matmul.is_packed(p) for p in jax.tree.leaves(self.params))
        kv_in = (self.param_shardings, repl, self.kv_sharding, self.kv_sharding, repl)
        kv_out = (self.kv_sharding, self.kv_sharding)
        self._mixed = jax.jit(
            functools.partial(steps.mixed_step, graphdef, self.kernel),
            in_shardings=kv_in,
            out_shardings=(*kv_out, repl, repl, repl),
            donate_argnums=(2, 3),
        )
        self.draft_probs = draft_probs
        self.probs_always = False  # fetch them for greedy batches too (a tree's siblings)
        self._slice = jax.jit(
            functools.partial(
                steps.decode_slice, graphdef, self.kernel, self.Z, cfg.slice_len, probs=draft_probs
            ),
            in_shardings=kv_in,
            out_shardings=(*kv_out, repl, repl, repl) + ((repl,) if draft_probs else ()),
            donate_argnums=(2, 3),
        )
        # verification by Leviathan's rejection rule: the mixed steps of L > 1 take the
        # draft's distributions (zeros, kept on device, when no sampled slot has any)
        spec = cfg.spec
        self.verify_probs = spec is not None and spec.rejection
        # token trees: verify steps take each node's parent (plan.draft_tree)
        self.trees = spec is not None and spec.tree_width > 1
        self._no_probs: dict[tuple[int, int], jax.Array] = {}
        self._exe: dict[Shape, object] = {}  # ahead-of-time compiled steps, by shape
        self._read = jax.jit(steps.read_pages, out_shardings=(repl, repl))
        self._write = jax.jit(steps.write_pages, out_shardings=kv_out, donate_argnums=(0, 1))

    # -- compile counting -------------------------------------------------------------

    @contextlib.contextmanager
    def _counting(self):
        before = CompileCounter.count()
        try:
            yield
        finally:
            self.compiles += CompileCounter.count() - before

    @property
    def compiles_since_warmup(self) -> int:
        base = self.compiles_at_warmup
        return 0 if base is None else self.compiles - base

    def transfer_sizes(self) -> list[int]:
        """Page counts a KV transfer compiles for (powers of two up to a whole context)."""
        out, m = [], 1
        while m < self.W:
            out.append(m)
            m *= 2
        return [*out, self.W]

    # -- batch building -------------------------------------------------------------

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
        }

    def _draft_probs(self, plan: StepPlan, D: int, L: int) -> dict:
        """`dec_q` [D, L - 1, V]: each decode slot's draft distributions, for the rejection
        rule (only when this runner verifies by it, and in steps of L > 1)."""
        if not self.verify_probs or L == 1 or not D:
            return {}
        V = self.model_cfg.vocab_size
        given = [(i, plan.draft_probs.get(s.id)) for i, (s, _) in enumerate(plan.decodes)]
        given = [(i, q) for i, q in given if q is not None and len(q)]
        if not given:
            if (D, L) not in self._no_probs:
                zeros = np.zeros((D, L - 1, V), np.float32)
                self._no_probs[D, L] = jax.device_put(zeros, self.repl)
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
        del bundle["sample_pos"]  # the slice derives each iteration's position on device
        return bundle

    # -- running ------------------------------------------------------------------

    def run(self, plan: StepPlan) -> StepResult:
        """One device step: the plan's copy-on-write copies, then its compute."""
        t_build = time.perf_counter()
        shape = shape_for(plan, self.cfg)
        build = self.build_mixed if shape.kind == "mixed" else self.build_slice
        bundle = build(plan, shape)
        want_logprobs = any(s.request.sampling.logprobs for s, _ in plan.work)
        t0 = time.perf_counter()
        bundle = jax.device_put(bundle, self.repl)  # the one explicit host -> device transfer
        with self._counting(), jax.set_mesh(self.mesh):
            fn = self._exe.get(shape) or (self._mixed if shape.kind == "mixed" else self._slice)
            out = fn(self.params, self.tables, self.k, self.v, bundle)
            self.k, self.v, tok, logp, extra, *q = out  # extra: accepted drafts | iterations
            want_probs = bool(q) and (
                self.probs_always or any(s.request.sampling.temperature > 0 for s, _ in plan.work)
            )
            fetch = {"tok": tok, "extra": extra}
            if want_logprobs:
                fetch["logp"] = logp
            if want_probs:
                fetch["q"] = q[0]
            out = jax.device_get(fetch)
        device_s = time.perf_counter() - t0
        iters = 1 if shape.kind == "mixed" else int(out["extra"])
        samples, logprobs = self._per_entry(
            plan, shape, out["tok"], out.get("logp"), iters, out["extra"]
        )
        probs = None
        if want_probs:  # a draft slice: entry i's tokens were drawn from q[:, i]
            probs = [out["q"][: len(t), i] for i, t in enumerate(samples)]
        return StepResult(
            shape.kind, shape.dims, samples, logprobs, iters, device_s, t0 - t_build, probs
        )

    @staticmethod
    def _per_entry(plan, shape, tok, logp, iters, accepted):
        """Split the step's sampled tokens (and log-probabilities) by plan entry: a decode slot
        of a mixed step keeps its accepted drafts and one more token."""
        if shape.kind == "decode":
            picks = [(slice(0, min(iters, n)), i) for i, (_, n) in enumerate(plan.work)]
        else:
            L, row0 = shape.L, shape.D * shape.L
            decodes = {s.id: i for i, (s, _) in enumerate(plan.decodes)}
            rows = {s.id: r for r, (s, _) in enumerate(plan.prefills)}
            picks = [
                slice(decodes[s.id] * L, decodes[s.id] * L + min(n, accepted[decodes[s.id]] + 1))
                if s.id in decodes
                else slice(row0 + rows[s.id], row0 + rows[s.id] + 1)
                for s, n in plan.work
            ]
        samples = [tok[p].tolist() for p in picks]
        logprobs = None if logp is None else [logp[p].tolist() for p in picks]
        return samples, logprobs

    # -- KV transfers ---------------------------------------------------------------

    def read_pages(self, pages: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """[N, len(pages), Z, K, X] host copies of the pages' K and V (swap out, send)."""
        M = bucket(tuple(self.transfer_sizes()), len(pages))
        idx = np.zeros(M, np.int32)
        idx[: len(pages)] = pages
        with self._counting(), jax.set_mesh(self.mesh):
            k, v = jax.device_get(self._read(self.k, self.v, jax.device_put(idx, self.repl)))
        return k[:, : len(pages)], v[:, : len(pages)]

    def write_pages(self, pages: Sequence[int], k: np.ndarray, v: np.ndarray) -> None:
        """Write host copies back into `pages` (swap in, receive)."""
        M = bucket(tuple(self.transfer_sizes()), len(pages))
        idx = np.zeros(M, np.int32)
        idx[: len(pages)] = pages
        pad = [(0, 0), (0, M - len(pages))] + [(0, 0)] * 3
        idx, kd, vd = jax.device_put((idx, np.pad(k, pad), np.pad(v, pad)), self.repl)
        with self._counting(), jax.set_mesh(self.mesh):
            self.k, self.v = self._write(self.k, self.v, idx, kd, vd)

    # -- profiling ------------------------------------------------------------------

    def profile(self, shapes: Sequence[Shape], reps: int = 3) -> dict[Shape, float]:
        """Seconds of one call of each compiled shape, best of `reps`, run on padding slots (a
        decode slice runs one iteration): the step-cost table of adaptive speculation before
        any step was measured. Padding writes only the null page."""
        out = {}
        for shape in shapes:
            build = self.build_mixed if shape.kind == "mixed" else self.build_slice
            bundle = build(StepPlan(), shape)
            if shape.kind == "decode":
                bundle["steps"][:] = 1
            bundle = jax.device_put(bundle, self.repl)
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                with self._counting(), jax.set_mesh(self.mesh):
                    res = self._exe[shape](self.params, self.tables, self.k, self.v, bundle)
                    self.k, self.v = res[0], res[1]
                    jax.block_until_ready(res[2])
                best = min(best, time.perf_counter() - t0)
            out[shape] = best
        return out

    # -- warm-up --------------------------------------------------------------------

    def warmup(self, progress=None) -> int:
        """Compile every declared shape, ahead of time and in parallel (XLA compiles each on
        its own thread; with the persistent compilation cache a second start loads them)."""
        shapes = all_shapes(self.cfg)
        if len(shapes) > MANY_SHAPES:
            logging.warning(
                "%d compiled shapes: XLA:CPU maps each program's code separately, and near 150 "
                "one process ran out of memory mappings here (LLVM 'Cannot allocate memory', "
                "vm.max_map_count 65530); declare coarser mixed_decode_buckets, prefill_buckets "
                "or fewer decode_widths",
                len(shapes),
            )
        done = [0]
        lock = threading.Lock()

        def compile_one(shape: Shape):
            before = CompileCounter.count()
            with jax.set_mesh(self.mesh):
                fn, build = (
                    (self._mixed, self.build_mixed)
                    if shape.kind == "mixed"
                    else (self._slice, self.build_slice)
                )
                bundle = jax.device_put(build(StepPlan(), shape), self.repl)
                exe = fn.lower(self.params, self.tables, self.k, self.v, bundle).compile()
            with lock:
                self.compiles += CompileCounter.count() - before
                done[0] += 1
                if progress:
                    progress(done[0] - 1, len(shapes), shape)
            return shape, exe

        workers = max(1, min(len(shapes), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            self._exe.update(pool.map(compile_one, shapes))
        if self.cfg.preemption == "swap":
            for m in self.transfer_sizes():  # KV transfers: small programs, compiled in place
                with self._counting(), jax.set_mesh(self.mesh):
                    idx = jax.device_put(np.zeros(m, np.int32), self.repl)
                    kd, vd = self._read(self.k, self.v, idx)
                    self.k, self.v = self._write(self.k, self.v, idx, kd, vd)
            jax.block_until_ready(self.k)
        self.compiles_at_warmup = self.compiles
        return len(shapes) + (len(self.transfer_sizes()) if self.cfg.preemption == "swap" else 0)
