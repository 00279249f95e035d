"""The Pallas paged-attention kernel, run in interpret mode on CPU, equals the pure-JAX kernel:
decode groups, ragged prefill rows, f32 and packed bf16 caches, GQA, both flavours; and a model
step through PagedContext gives the same logits and cache with either kernel."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Transformer, pallas_attention
from models.paged_attention import pack, paged_attention
from models.paged_context import KernelOptions, PagedContext
from models.patterns import DenseCausal

FLAVOURS = pallas_attention.FLAVOURS
H, K, X, Z, P, W, N = 4, 2, 8, 4, 40, 6, 2  # GQA: two query heads per kv head
LAYER = 1


def _cache(rng, packed: bool):
    """K and V caches [N, P, Z, K, X] as stored (packed bf16 words or f32), and q's dtype."""
    dt = jnp.bfloat16 if packed else jnp.float32
    k, v = (jnp.asarray(rng.normal(size=(N, P, Z, K, X)), dt) for _ in range(2))
    return (pack(k), pack(v), dt) if packed else (k, v, dt)


def _pages(rng, G: int) -> np.ndarray:
    """Disjoint, non-contiguous page tables (page 0 is the null page)."""
    return rng.permutation(np.arange(1, P))[: G * W].reshape(G, W).astype(np.int32)


def _both(q, k, v, pages, q_pos, kv_len, flavour):
    pure = jax.jit(paged_attention, static_argnums=(6, 7, 8))
    ref = pure(q, k, v, pages, q_pos, kv_len, DenseCausal(), 2, LAYER)
    kernel = jax.jit(
        lambda *a: pallas_attention.paged_attention(*a, flavour=flavour, interpret=True),
        static_argnums=(3,),
    )
    got = kernel(q, k, v, LAYER, pages, q_pos, kv_len)
    assert got.dtype == q.dtype and got.shape == q.shape
    return np.asarray(got, np.float32), np.asarray(ref, np.float32)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_decode_equals_pure_jax(flavour, packed):
    rng = np.random.default_rng(0)
    kv_len = np.array([13, 0, 1, W * Z, 7], np.int32)  # a padding slot, a full table
    G = len(kv_len)
    k, v, dt = _cache(rng, packed)
    q = jnp.asarray(rng.normal(size=(G, 1, H, X)), dt)
    got, ref = _both(q, k, v, _pages(rng, G), (kv_len - 1)[:, None], kv_len, flavour)
    np.testing.assert_allclose(got, ref, atol=1e-2 if packed else 1e-5)
    assert np.all(got[1] == 0)  # kv_len 0: zeros, as the pure-JAX kernel gives


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_ragged_prefill_rows_equal_pure_jax(flavour, packed):
    """Rows of up to C tokens laid out as the runner does: a row's n tokens are the last n
    positions of its context, the rest of the row is padding cells at position 0."""
    rng = np.random.default_rng(1)
    C = 5
    n_R = np.array([5, 2, 3, 0])  # tokens per row; the last row is padding
    kv_len = np.array([17, 6, 3, 0], np.int32)
    R = len(n_R)
    q_pos = np.zeros((R, C), np.int32)
    for r in range(R):
        q_pos[r, : n_R[r]] = kv_len[r] - n_R[r] + np.arange(n_R[r])
    k, v, dt = _cache(rng, packed)
    q = jnp.asarray(rng.normal(size=(R, C, H, X)), dt)
    got, ref = _both(q, k, v, _pages(rng, R), q_pos, kv_len, flavour)
    np.testing.assert_allclose(got, ref, atol=1e-2 if packed else 1e-5)
    assert np.all(got[-1] == 0)


def test_constraints_and_backend_choice(caplog):
    assert pallas_attention.unsupported("tpu", 16, 64, jnp.bfloat16) is None
    assert "multiple of 8" in pallas_attention.unsupported("tpu", 12, 64, jnp.float32)
    assert pallas_attention.unsupported("gpu", 16, 64, jnp.bfloat16) is None  # 32 words
    assert "head dim 8" in pallas_attention.unsupported("gpu", 16, 16, jnp.bfloat16)
    assert "page_size 8" in pallas_attention.unsupported("gpu", 8, 64, jnp.float32)
    assert pallas_attention.flavour_for("cpu", 16, 64, jnp.float32) == ""
    assert pallas_attention.flavour_for("tpu", 16, 64, jnp.float32) == "tpu"
    with caplog.at_level(logging.WARNING):
        assert pallas_attention.flavour_for("gpu", 12, 64, jnp.float32) == ""
    assert "using pure JAX" in caplog.text
    with pytest.raises(ValueError, match="pallas"):
        KernelOptions(pallas="cuda")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_paged_context_step_equals_pure_jax(tiny_cfg, flavour, monkeypatch):
    """One mixed step of a tiny model (two decode slots, one of them padding; two prefill rows,
    one of them padding) after a prefill: same logits and cache with either kernel."""
    calls = []
    kernel_fn = pallas_attention.paged_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return kernel_fn(*args, **kwargs)

    monkeypatch.setattr(pallas_attention, "paged_attention", counting)
    cfg = tiny_cfg
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    Zm, Pm, Wm = 4, 24, 5
    rng = np.random.default_rng(2)
    pages_a = rng.permutation(np.arange(1, Pm))[:Wm].astype(np.int32)
    pages_b = rng.permutation(np.setdiff1d(np.arange(1, Pm), pages_a))[:Wm].astype(np.int32)
    tokens = rng.integers(0, cfg.vocab_size, 20).astype(np.int32)
    kshape = (cfg.n_layers, Pm, Zm, cfg.n_kv_heads, cfg.head_dim)

    def run(kernel, k, v, toks, pos, wpage, dec_pages, dec_len, pre_index, pre_pages, pre_len):
        @jax.jit
        def step(state, k, v):
            m = nnx.merge(graphdef, state)
            ctx = PagedContext(
                k, v, pos, wpage, pos % Zm, dec_pages, dec_len, pre_index, pre_pages, pre_len
            )
            ctx.kernel = kernel
            x, _ = m.forward(m.embed_tokens(toks), ctx)
            return m.logits(x), ctx.k, ctx.v

        return step(state, k, v)

    # sequence A's first 9 tokens, prefilled with the pure-JAX kernel
    pos = np.arange(9, dtype=np.int32)
    _, k, v = run(
        KernelOptions(2),
        jnp.zeros(kshape),
        jnp.zeros(kshape),
        tokens[:9],
        pos,
        pages_a[pos // Zm],
        np.zeros((0, Wm), np.int32),
        np.zeros((0,), np.int32),
        np.arange(9, dtype=np.int32)[None],
        pages_a[None],
        np.array([9], np.int32),
    )
    # the mixed step: A decodes position 9 (slot 0; slot 1 is padding); B prefills 0..5
    # (row 0; row 1 is padding, its cells point at the dummy token Tp = 6)
    pos = np.array([9, 0, *range(6)], np.int32)
    wpage = np.array([pages_a[2], 0, *pages_b[np.arange(6) // Zm]], np.int32)
    args = (
        tokens[9:17],
        pos,
        wpage,
        np.stack([pages_a, np.zeros(Wm, np.int32)]),
        np.array([10, 0], np.int32),
        np.array([[0, 1, 2, 3, 4, 5], [6] * 6], np.int32),
        np.stack([pages_b, np.zeros(Wm, np.int32)]),
        np.array([6, 0], np.int32),
    )
    ref = run(KernelOptions(2), k, v, *args)
    got = run(KernelOptions(2, pallas=flavour, interpret=True), k, v, *args)
    assert len(calls) == 2 * cfg.n_layers  # the decode group and the prefill rows, every layer
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), atol=2e-5)
    for a, b in zip(got[1:], ref[1:], strict=True):  # layer 1 writes K, V of layer 0's output
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize(
    "backend, serve, expected",
    [
        ("tpu", {}, "tpu"),
        ("gpu", {}, "gpu"),
        ("gpu", {"kv_dtype": "bfloat16"}, ""),  # 8 packed words per head: too narrow for Triton
        ("tpu", {"page_size": 12}, ""),
        ("tpu", {"native_kernels": False}, ""),
        ("cpu", {}, ""),
    ],
)
def test_runner_chooses_pallas_on_accelerators(tiny_cfg, monkeypatch, backend, serve, expected):
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.serve.runner import Runner
    from models import native_kernels

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(native_kernels, "available", lambda: False)  # keep its cache unpoisoned
    cfg = ServeConfig(**{"page_size": 16, "num_pages": 8, "max_seqs": 2, **serve})
    runner = Runner(Transformer(tiny_cfg, nnx.Rngs(0)), cfg)
    assert runner.kernel.pallas == expected


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("flavour, platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernel_lowers_for_its_accelerator(monkeypatch, flavour, platform, packed):
    """Pallas lowers the kernel to Mosaic (TPU) or Triton (GPU) IR on this CPU-only machine:
    the accelerator's own compiler never sees it here, so this only guards the Python side."""
    from jax import export
    from jax._src.pallas.mosaic import tpu_info  # private: Mosaic asks for a TPU to target

    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    tpu_info.get_tpu_info.cache_clear()
    G, L, X, Pn = 4, 3, 128, 64
    last, dt = (X // 2, jnp.uint32) if packed else (X, jnp.float32)
    fn = jax.jit(
        lambda *a: pallas_attention.paged_attention(*a, flavour=flavour), static_argnums=(3,)
    )
    shapes = (
        jax.ShapeDtypeStruct((G, L, H, X), jnp.bfloat16),
        jax.ShapeDtypeStruct((N, Pn, 16, K, last), dt),
        jax.ShapeDtypeStruct((N, Pn, 16, K, last), dt),
        LAYER,
        jax.ShapeDtypeStruct((G, W), jnp.int32),
        jax.ShapeDtypeStruct((G, L), jnp.int32),
        jax.ShapeDtypeStruct((G,), jnp.int32),
    )
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    try:
        exported = export.export(fn, platforms=[platform], disabled_checks=[triton])(*shapes)
    finally:
        tpu_info.get_tpu_info.cache_clear()  # forget the pretend TPU
    text = exported.mlir_module()
    assert ("tpu_custom_call" if flavour == "tpu" else "xla.gpu.triton") in text
