"""The runner: fixed-shape batches, the jitted steps, warm-up and compile counting.

Every step compiles for a shape from a finite set declared by ServeConfig:

- mixed steps: (decode slots D in {0} + decode_buckets) x (prefill tokens Tp in prefill_buckets)
- decode slices: D in decode_buckets, slice length S
- swap transfers: page counts in powers of two (only with preemption="swap")

The page-table width is fixed (pages for the longest allowed context); the
context-length "bucket" is chosen at run time inside paged attention (its
loop runs only over the chunks the longest context in the batch needs), so
short contexts don't pay for the longest. `warmup()` compiles every shape;
afterwards `compiles_since_warmup` must stay 0.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from mlx_sched.serve import steps
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.request import Seq
from models import native_kernels
from models.config import DTYPES
from models.paged_attention import KernelOptions, cache_layout

NUM_STOP_IDS = 8  # stop tokens per request checked on device inside a slice


class CompileCounter:
    """Counts XLA backend compilations in this process (a jax.monitoring listener)."""

    count = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return

        def listener(event, duration, **kwargs):
            if event == "/jax/core/compile/backend_compile_duration":
                cls.count += 1

        jax.monitoring.register_event_duration_secs_listener(listener)
        cls._installed = True


@dataclasses.dataclass
class StepResult:
    kind: str  # "mixed" or "decode"
    shape: tuple  # the compiled bucket used
    tokens: np.ndarray  # mixed: [D + R]; decode: [S, D]
    logprobs: np.ndarray
    iters: int  # decode iterations run (1 for mixed)
    device_s: float  # dispatch -> results on host
    build_s: float = 0.0  # host time spent building the batch


def stop_ids(s: Seq, eos_token: int) -> list[int]:
    """The token ids that end sequence `s`: its stop tokens, plus EOS unless ignored."""
    sp = s.request.sampling
    stops = list(sp.stop_tokens)
    if eos_token >= 0 and not sp.ignore_eos:
        stops.append(eos_token)
    if len(stops) > NUM_STOP_IDS:
        raise ValueError(f"at most {NUM_STOP_IDS - 1} stop tokens per request")
    return stops


def _bucket(buckets: tuple[int, ...], n: int) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


class Runner:
    def __init__(self, model: nnx.Module, cfg: ServeConfig, mesh: jax.sharding.Mesh | None = None):
        CompileCounter.install()
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
        zeros = jax.jit(lambda: jnp.zeros(shape, storage), out_shardings=self.kv_sharding)
        self.k, self.v = zeros(), zeros()
        # the native decode kernel runs on one CPU device; sharded meshes use pure JAX
        native = cfg.native_kernels and self.mesh.size == 1 and native_kernels.available()
        self.kernel = KernelOptions(cfg.attn_chunk_pages, native)
        repl = self.repl = sharding.replicated(self.mesh)
        kv_in = (self.param_shardings, self.kv_sharding, self.kv_sharding, repl)
        kv_out = (self.kv_sharding, self.kv_sharding)
        self._mixed = jax.jit(
            functools.partial(steps.mixed_step, graphdef, self.kernel),
            in_shardings=kv_in,
            out_shardings=(*kv_out, repl, repl),
            donate_argnums=(1, 2),
        )
        self._decode = jax.jit(
            functools.partial(steps.decode_slice, graphdef, self.kernel, self.Z, cfg.slice_len),
            in_shardings=kv_in,
            out_shardings=(*kv_out, repl, repl, repl),
            donate_argnums=(1, 2),
        )
        self._read = jax.jit(steps.read_pages, out_shardings=(repl, repl))
        self._write = jax.jit(steps.write_pages, out_shardings=kv_out, donate_argnums=(0, 1))
        self.compiles_at_warmup: int | None = None

    # -- shapes -----------------------------------------------------------------

    def mixed_shapes(self) -> list[tuple[int, int]]:
        return [(d, t) for d in (0, *self.cfg.decode_buckets) for t in self.cfg.prefill_buckets]

    def decode_shapes(self) -> list[int]:
        return list(self.cfg.decode_buckets)

    def swap_shapes(self) -> list[int]:
        if self.cfg.preemption != "swap":
            return []
        out, m = [], 1
        while m < self.W:
            out.append(m)
            m *= 2
        return [*out, self.W]

    @property
    def compiles_since_warmup(self) -> int:
        base = self.compiles_at_warmup
        return 0 if base is None else CompileCounter.count - base

    # -- batch building -----------------------------------------------------------

    def _sampling_rows(self, seqs: list[Seq | None], positions: list[int]) -> dict:
        n = len(seqs)
        out = {
            "temperature": np.zeros(n, np.float32),
            "top_k": np.zeros(n, np.int32),
            "top_p": np.ones(n, np.float32),
            "seed": np.zeros(n, np.int32),
            "seq_index": np.zeros(n, np.int32),
            "sample_pos": np.zeros(n, np.int32),
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
            out["sample_pos"][i] = positions[i]
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

    def build_mixed(self, decode: list[Seq], prefill: list[tuple[Seq, int]], copies) -> tuple:
        """The bundle for one mixed step; returns (shape, bundle)."""
        Z, R = self.Z, self.cfg.max_prefill_rows
        n_pre = sum(n for _, n in prefill)
        D = 0 if not decode else _bucket(self.cfg.decode_buckets, len(decode))
        Tp = _bucket(self.cfg.prefill_buckets, max(1, n_pre))
        C = min(self.cfg.prefill_chunk, Tp)
        if len(prefill) > R or any(n > C for _, n in prefill):
            raise ValueError(f"prefill rows {[n for _, n in prefill]} exceed {R} rows of {C}")
        T = D + Tp
        tokens, positions = np.zeros(T, np.int32), np.zeros(T, np.int32)
        wpage, woff = np.zeros(T, np.int32), np.zeros(T, np.int32)
        dec_len = np.zeros(D, np.int32)
        for i, s in enumerate(decode):
            p = s.num_computed
            tokens[i], positions[i] = s.tokens[p], p
            wpage[i], woff[i], dec_len[i] = s.pages[p // Z], p % Z, p + 1
        pre_index = np.full((R, C), Tp, np.int32)
        pre_len = np.zeros(R, np.int32)
        sample_index = np.zeros(D + R, np.int32)
        sample_index[: len(decode)] = np.arange(len(decode))
        off = 0
        for r, (s, n) in enumerate(prefill):
            p0 = s.num_computed
            sl = slice(D + off, D + off + n)
            pos = np.arange(p0, p0 + n)
            tokens[sl], positions[sl] = s.tokens[p0 : p0 + n], pos
            pages = np.asarray(s.pages, np.int32)
            wpage[sl], woff[sl] = pages[pos // Z], pos % Z
            pre_index[r, :n] = np.arange(off, off + n)
            pre_len[r] = p0 + n
            sample_index[D + r] = D + off + n - 1
            off += n
        rows: list[Seq | None] = [*decode, *[None] * (D - len(decode))]
        rows += [s for s, _ in prefill] + [None] * (R - len(prefill))
        sample_pos = [s.num_computed + 1 for s in decode] + [0] * (D - len(decode))
        sample_pos += [s.num_computed + n for s, n in prefill] + [0] * (R - len(prefill))
        bundle = {
            "tokens": tokens,
            "positions": positions,
            "write_page": wpage,
            "write_offset": woff,
            "dec_pages": self._table(decode, D),
            "dec_len": dec_len,
            "pre_index": pre_index,
            "pre_pages": self._table([s for s, _ in prefill], R),
            "pre_len": pre_len,
            "sample_index": sample_index,
            **self._sampling_rows(rows, sample_pos),
            **self._copies(copies),
        }
        return (D, Tp), bundle

    def build_decode(self, decode: list[Seq], steps_per_seq: list[int], copies) -> tuple:
        D = _bucket(self.cfg.decode_buckets, len(decode))
        n = len(decode)
        tokens, positions = np.zeros(D, np.int32), np.zeros(D, np.int32)
        n_steps = np.zeros(D, np.int32)
        stop_ids = np.full((D, NUM_STOP_IDS), -1, np.int32)
        for i, s in enumerate(decode):
            p = s.num_computed
            tokens[i], positions[i], n_steps[i] = s.tokens[p], p, steps_per_seq[i]
            stops = self.stop_ids(s)
            stop_ids[i, : len(stops)] = stops
        rows: list[Seq | None] = [*decode, *[None] * (D - n)]
        bundle = {
            "tokens": tokens,
            "positions": positions,
            "pages": self._table(decode, D),
            "steps": n_steps,
            "stop_ids": stop_ids,
            **self._sampling_rows(rows, [0] * D),
            **self._copies(copies),
        }
        del bundle["sample_pos"]
        return D, bundle

    def stop_ids(self, s: Seq) -> list[int]:
        return stop_ids(s, self.cfg.eos_token)

    # -- running ------------------------------------------------------------------

    def run_mixed(self, decode, prefill, copies=()) -> StepResult:
        t_build = time.perf_counter()
        shape, bundle = self.build_mixed(decode, prefill, list(copies))
        t0 = time.perf_counter()
        bundle = jax.device_put(bundle, self.repl)  # the one explicit host -> device transfer
        with jax.set_mesh(self.mesh):
            self.k, self.v, tok, logp = self._mixed(self.params, self.k, self.v, bundle)
        tok, logp = jax.device_get((tok, logp))
        return StepResult("mixed", shape, tok, logp, 1, time.perf_counter() - t0, t0 - t_build)

    def run_decode(self, decode, steps_per_seq, copies=()) -> StepResult:
        t_build = time.perf_counter()
        D, bundle = self.build_decode(decode, steps_per_seq, list(copies))
        t0 = time.perf_counter()
        bundle = jax.device_put(bundle, self.repl)
        with jax.set_mesh(self.mesh):
            self.k, self.v, tok, logp, iters = self._decode(self.params, self.k, self.v, bundle)
        tok, logp, iters = jax.device_get((tok, logp, iters))
        shape = (D, self.cfg.slice_len)
        return StepResult(
            "decode", shape, tok, logp, int(iters), time.perf_counter() - t0, t0 - t_build
        )

    def swap_out(self, pages: list[int]) -> tuple[np.ndarray, np.ndarray]:
        M = _bucket(tuple(self.swap_shapes()), len(pages))
        idx = np.zeros(M, np.int32)
        idx[: len(pages)] = pages
        idx = jax.device_put(idx, self.repl)
        with jax.set_mesh(self.mesh):
            k, v = jax.device_get(self._read(self.k, self.v, idx))
        return k[:, : len(pages)], v[:, : len(pages)]

    def swap_in(self, pages: list[int], k_data: np.ndarray, v_data: np.ndarray) -> None:
        M = _bucket(tuple(self.swap_shapes()), len(pages))
        idx = np.zeros(M, np.int32)
        idx[: len(pages)] = pages
        pad = [(0, 0), (0, M - len(pages))] + [(0, 0)] * 3
        idx, kd, vd = jax.device_put((idx, np.pad(k_data, pad), np.pad(v_data, pad)), self.repl)
        with jax.set_mesh(self.mesh):
            self.k, self.v = self._write(self.k, self.v, idx, kd, vd)

    # -- warm-up --------------------------------------------------------------------

    def warmup(self, progress=None) -> int:
        """Compile every declared shape (all-padding batches write only the null page)."""
        shapes = (
            [("mixed", s) for s in self.mixed_shapes()]
            + [("decode", d) for d in self.decode_shapes()]
            + [("swap", m) for m in self.swap_shapes()]
        )
        R = self.cfg.max_prefill_rows
        for i, (kind, shape) in enumerate(shapes):
            if progress:
                progress(i, len(shapes), kind, shape)
            if kind == "mixed":
                D, Tp = shape
                C = min(self.cfg.prefill_chunk, Tp)
                bundle = jax.device_put(self._dummy_mixed(D, Tp, R, C), self.repl)
                with jax.set_mesh(self.mesh):
                    self.k, self.v, tok, _ = self._mixed(self.params, self.k, self.v, bundle)
            elif kind == "decode":
                bundle = jax.device_put(self._dummy_decode(shape), self.repl)
                with jax.set_mesh(self.mesh):
                    self.k, self.v, tok, *_ = self._decode(self.params, self.k, self.v, bundle)
            else:
                idx = jax.device_put(np.zeros(shape, np.int32), self.repl)
                with jax.set_mesh(self.mesh):
                    kd, vd = self._read(self.k, self.v, idx)
                    self.k, self.v = self._write(self.k, self.v, idx, kd, vd)
                tok = self.k
            jax.block_until_ready(tok)
        self.compiles_at_warmup = CompileCounter.count
        return len(shapes)

    def _dummy_mixed(self, D, Tp, R, C) -> dict:
        z = lambda *s: np.zeros(s, np.int32)
        rows = self._sampling_rows([None] * (D + R), [0] * (D + R))
        return {
            "tokens": z(D + Tp),
            "positions": z(D + Tp),
            "write_page": z(D + Tp),
            "write_offset": z(D + Tp),
            "dec_pages": z(D, self.W),
            "dec_len": z(D),
            "pre_index": np.full((R, C), Tp, np.int32),
            "pre_pages": z(R, self.W),
            "pre_len": z(R),
            "sample_index": z(D + R),
            **rows,
            **self._copies([]),
        }

    def _dummy_decode(self, D) -> dict:
        z = lambda *s: np.zeros(s, np.int32)
        rows = self._sampling_rows([None] * D, [0] * D)
        del rows["sample_pos"]
        return {
            "tokens": z(D),
            "positions": z(D),
            "pages": z(D, self.W),
            "steps": z(D),
            "stop_ids": np.full((D, NUM_STOP_IDS), -1, np.int32),
            **rows,
            **self._copies([]),
        }
