"""The device runner: fixed-shape batches, the jitted steps, KV transfers, warm-up, compile counts.

Every step compiles for a shape from the finite set `shapes.all_shapes(cfg)`
(mixed steps `(D, L, Tp)`, decode slices `(D, S)`), and KV transfers for page
counts in powers of two (with preemption="swap" or kv_transfer). The page-table width
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
from mlx_sched.serve.adapter_device import PageSlots
from mlx_sched.serve.batches import BatchBuilder, Packed, unpacking
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.interface import StepResult
from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.shapes import Shape, all_shapes, bucket, shape_for
from models import lora_pool, native_kernels, packed_matmul, pallas_attention
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


class Runner(BatchBuilder):
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
        mc = model.cfg
        last, storage = cache_layout(mc.head_dim, DTYPES[cfg.kv_dtype or mc.dtype])
        self.lora_specs = self.lora_layout = None
        if cfg.lora:  # adapters stored in KV pages (S-LoRA's unified paging)
            lc, page = cfg.lora_cfg, (self.Z, mc.n_kv_heads, last)
            packed = jnp.dtype(storage) == jnp.uint32
            model, self.lora_layout = lora_pool.attach_pool(
                model, lc.targets, lc.max_rank, page, packed
            )
            self.lora_specs = lora_pool.pool_specs(self.lora_layout)
        graphdef, params = nnx.split(model, nnx.Param)
        compute = model.cfg.compute_dtype
        if jnp.dtype(compute).itemsize < 4:  # serving keeps no f32 master copy: cast once, not
            params = jax.tree.map(lambda p: p.astype(compute), params)  # at every matmul
        self.param_shardings = sharding.state_shardings(self.mesh, params)
        self.params = sharding.place(params, self.param_shardings)
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
            functools.partial(unpacking(steps.mixed_step), graphdef, self.kernel),
            in_shardings=kv_in,
            out_shardings=(*kv_out, repl, repl, repl),
            donate_argnums=(2, 3),
        )
        self.draft_probs = draft_probs
        self.probs_always = False  # fetch them for greedy batches too (a tree's siblings)
        self._slice = jax.jit(
            functools.partial(
                unpacking(steps.decode_slice),
                graphdef,
                self.kernel,
                self.Z,
                cfg.slice_len,
                probs=draft_probs,
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
        self.adapter_slots = None
        if cfg.lora:
            self.adapter_slots = PageSlots(self, cfg.lora_cfg.slots, self.lora_layout)

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

    @property
    def transfers_compiled(self) -> bool:
        """Whether warm-up compiles the KV transfer programs (swap, or moving KV between
        engines)."""
        return self.cfg.preemption == "swap" or self.cfg.kv_transfer

    def transfer_sizes(self) -> list[int]:
        """Page counts a KV transfer compiles for (powers of two up to a whole context)."""
        out, m = [], 1
        while m < self.W:
            out.append(m)
            m *= 2
        return [*out, self.W]

    # -- running ------------------------------------------------------------------

    def _to_device(self, bundle: dict) -> Packed:
        """A step's host arrays on the device: the one explicit host -> device transfer, of
        one packed buffer (`Packed`) rather than a dozen small arrays."""
        return jax.device_put(Packed.pack(bundle), self.repl)

    def run(self, plan: StepPlan) -> StepResult:
        """One device step: the plan's copy-on-write copies, then its compute."""
        t_build = time.perf_counter()
        shape = shape_for(plan, self.cfg)
        build = self.build_mixed if shape.kind == "mixed" else self.build_slice
        bundle = build(plan, shape)
        want_logprobs = any(s.request.sampling.logprobs for s, _ in plan.work)
        t0 = time.perf_counter()
        bundle = self._to_device(bundle)
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

    # -- parameters -----------------------------------------------------------------

    def update_params(self, updates) -> int:
        """Replace some parameters of the serving copy in place, e.g. MoE routers or norms after
        a tuning step (`cotrain`): `updates` is an nnx State or a flat {path: array} of the
        model's own paths. Each value keeps its parameter's shape, is cast to the serving
        dtype and placed with the parameter's sharding, so no step recompiles and the other
        weights are neither copied nor moved. Projections packed for the native matmul and
        the embedding table (the source of the lookup tables) are refused. -> leaves updated."""
        flat = dict(nnx.to_flat_state(self.params))
        shard = dict(nnx.to_flat_state(self.param_shardings))
        items = nnx.to_flat_state(updates) if isinstance(updates, nnx.State) else updates.items()
        new = {}
        for path, value in items:
            path = tuple(path)
            name = "/".join(map(str, path))
            var = flat.get(path)
            if var is None:
                raise ValueError(f"update_params: the model has no parameter {name}")
            value = value.get_value() if isinstance(value, nnx.Variable) else value
            old = var.get_value()
            if path == ("embed",) or packed_matmul.is_packed(old):
                raise ValueError(
                    f"update_params: {name} is "
                    + ("the embedding table" if path == ("embed",) else "packed for serving")
                    + "; only unpacked parameters (MoE routers, norms, adapters) update in place"
                )
            if tuple(value.shape) != tuple(old.shape):
                raise ValueError(
                    f"update_params: {name} has shape {tuple(old.shape)}, got {tuple(value.shape)}"
                )
            sharding_ = shard[path]
            sharding_ = sharding_.get_value() if isinstance(sharding_, nnx.Variable) else sharding_
            new[path] = var.replace(jax.device_put(jnp.asarray(value, old.dtype), sharding_))
        flat.update(new)
        self.params = nnx.from_flat_state(flat)
        return len(new)

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

    def profile(self, shapes: Sequence[Shape], reps: int = 3, iters: int = 1) -> dict[Shape, float]:
        """Seconds of one call of each compiled shape, best of `reps`, run on padding slots (a
        decode slice runs `iters` iterations, at most its S): the step-cost table of adaptive
        speculation before any step was measured. Padding writes only the null page."""
        out = {}
        for shape in shapes:
            build = self.build_mixed if shape.kind == "mixed" else self.build_slice
            bundle = build(StepPlan(), shape)
            if shape.kind == "decode":
                bundle["steps"][:] = min(iters, shape.S)
            bundle = self._to_device(bundle)
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
                bundle = self._to_device(build(StepPlan(), shape))
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
        if self.transfers_compiled:
            for m in self.transfer_sizes():  # KV transfers: small programs, compiled in place
                with self._counting(), jax.set_mesh(self.mesh):
                    idx = jax.device_put(np.zeros(m, np.int32), self.repl)
                    kd, vd = self._read(self.k, self.v, idx)
                    self.k, self.v = self._write(self.k, self.v, idx, kd, vd)
            jax.block_until_ready(self.k)
        if self.adapter_slots is not None:
            self.adapter_slots.warmup()
        self.compiles_at_warmup = self.compiles
        return len(shapes) + (len(self.transfer_sizes()) if self.transfers_compiled else 0)
