"""The native decode kernel: its cache key, its fallback on a failed build, exactness at edges."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import native_kernels
from models.paged_attention import pack, paged_attention
from models.patterns import DenseCausal


def test_cache_key_changes_with_cpu_and_compiler(monkeypatch):
    def key(cpu: str, compiler: str) -> str:
        monkeypatch.setattr(native_kernels, "_cpu_flags", lambda: cpu)
        monkeypatch.setattr(native_kernels, "_compiler_identity", lambda cxx: compiler)
        return native_kernels.cache_key("g++")

    base = key("avx avx2 fma sse4_2", "/usr/bin/g++-12\ng++ 12.2.0")
    assert key("avx avx2 fma sse4_2", "/usr/bin/g++-12\ng++ 12.2.0") == base
    assert key("avx avx2 avx512f fma sse4_2", "/usr/bin/g++-12\ng++ 12.2.0") != base
    assert key("avx avx2 fma sse4_2", "/usr/bin/g++-12\ng++ 12.3.0") != base
    assert key("avx avx2 fma sse4_2", "/opt/gcc/bin/g++\ng++ 12.2.0") != base


def test_cache_key_changes_with_an_included_header(tmp_path, monkeypatch):
    monkeypatch.setattr(native_kernels, "_compiler_identity", lambda cxx: "g++ 12")
    source = tmp_path / "kernel.cc"
    source.write_text('#include "pool.h"\n')
    (tmp_path / "pool.h").write_text("// one\n")
    before = native_kernels.cache_key("g++", source)
    (tmp_path / "pool.h").write_text("// two\n")
    assert native_kernels.cache_key("g++", source) != before


def test_cpu_flags_are_read_and_sorted():
    flags = native_kernels._cpu_flags().split()
    assert flags and flags == sorted(flags)


@pytest.fixture
def fresh_available(monkeypatch, tmp_path):
    """available() recomputed under a throwaway kernel cache; recomputed again afterwards, so
    later tests get the real kernel (registering the same library twice is allowed)."""
    monkeypatch.setenv("MLX_SCHED_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.delenv("MLX_SCHED_NATIVE", raising=False)
    native_kernels.available.cache_clear()
    yield native_kernels.available
    native_kernels.available.cache_clear()


def test_failed_build_warns_with_the_compiler_errors(
    fresh_available, monkeypatch, tmp_path, caplog
):
    cxx = tmp_path / "broken-c++"
    cxx.write_text(
        "#!/bin/sh\necho 'paged_decode.cc:1:1: error: no vector unit here' >&2\nexit 1\n"
    )
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    with caplog.at_level(logging.WARNING):
        assert fresh_available() is False
    (warning,) = [r.getMessage() for r in caplog.records if "native paged-decode" in r.message]
    assert "exited with 1" in warning and "error: no vector unit here" in warning
    assert not list((tmp_path / "kernels").glob("*.so"))


@pytest.mark.parametrize("packed", [False, True])
def test_native_decode_exact_at_edges(packed):
    """An empty context gives exact zeros; scores of +-1e4 (softmax at its limits, rescales of
    exp(-2e4) = 0 between pages) match the pure-JAX kernel; nothing is NaN or inf."""
    if not native_kernels.available():
        pytest.skip("no C++ compiler: the engine uses the pure-JAX kernel")
    rng = np.random.default_rng(7)
    G, H, K, X, Z, P, W, N, layer = 4, 4, 2, 8, 4, 40, 9, 2, 1
    kv_len = np.array([0, 33, 30, 21], np.int32)  # empty, huge +-, huge negative, ordinary
    pages = rng.permutation(np.arange(1, P))[: G * W].reshape(G, W).astype(np.int32)
    k = rng.normal(size=(N, P, Z, K, X)).astype(np.float32)
    v = rng.normal(size=(N, P, Z, K, X)).astype(np.float32)
    q = rng.normal(size=(G, H, X)).astype(np.float32)
    k[:, pages[1]] *= 5e3  # scores of order +-1e4
    k[:, pages[2]] = -5e3 * np.abs(k[:, pages[2]])  # every score about -1e4
    q[2] = np.abs(q[2])
    dt = jnp.bfloat16 if packed else jnp.float32
    k, v, q = jnp.asarray(k, dt), jnp.asarray(v, dt), jnp.asarray(q, dt)
    kc, vc = (pack(k), pack(v)) if packed else (k, v)
    got = np.asarray(
        jax.jit(native_kernels.paged_decode, static_argnums=(5,))(q, kc, vc, pages, kv_len, layer)
    )
    ref = jax.jit(paged_attention, static_argnums=(6, 7, 8))(
        q[:, None], kc, vc, pages, (kv_len - 1)[:, None], kv_len, DenseCausal(), 2, layer
    )[:, 0]
    assert np.all(np.isfinite(got))
    assert np.all(got[0] == 0)
    np.testing.assert_allclose(got, np.asarray(ref, np.float32), atol=1e-2 if packed else 1e-5)


def _reference_decode(q, k, v, pages, kv_len, layer):
    """float64 numpy decode attention: positions [0, kv_len) of in-range pages only."""
    G, H, X = q.shape
    _, P, Z, K, _ = k.shape
    out = np.zeros((G, H, X))
    for g in range(G):
        n = min(int(kv_len[g]), pages.shape[1] * Z)
        rows = [(p, t) for w, p in enumerate(pages[g]) for t in range(Z) if w * Z + t < n]
        rows = [(p, t) for p, t in rows if 0 <= p < P]
        if not rows:
            continue
        kg = np.stack([k[layer, p, t] for p, t in rows]).astype(np.float64)  # [T, K, X]
        vg = np.stack([v[layer, p, t] for p, t in rows]).astype(np.float64)
        for h in range(H):
            s = kg[:, h // (H // K)] @ q[g, h].astype(np.float64) / np.sqrt(X)
            e = np.exp(s - s.max())
            out[g, h] = e @ vg[:, h // (H // K)] / e.sum()
    return out


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    "H,K,X,Z",
    [(8, 8, 64, 16), (8, 2, 64, 16), (4, 2, 96, 8), (4, 1, 128, 32), (2, 2, 48, 16)],
)
def test_native_decode_model_head_shapes(packed, H, K, X, Z):
    """Head sizes of real models (the vectorised paths, their remainders and the scalar one):
    GQA, partial last pages, kv_len 0 and past the page table, out-of-range page ids skipped."""
    if not native_kernels.available():
        pytest.skip("no C++ compiler: the engine uses the pure-JAX kernel")
    rng = np.random.default_rng(11)
    G, P, W, N, layer = 8, 64, 5, 2, 1
    kv_len = np.array([0, 1, Z, Z + 3, 2 * Z - 1, W * Z, W * Z + 7, 3 * Z + 1], np.int32)
    pages = rng.permutation(np.arange(P))[: G * W].reshape(G, W).astype(np.int32)
    pages[7, 1], pages[7, 2], pages[5, 0] = -1, P, 1 << 30  # skipped, as if absent
    dt = jnp.bfloat16 if packed else jnp.float32
    k = jnp.asarray(rng.normal(size=(N, P, Z, K, X)), dt)
    v = jnp.asarray(rng.normal(size=(N, P, Z, K, X)), dt)
    q = jnp.asarray(3 * rng.normal(size=(G, H, X)), jnp.float32)
    kc, vc = (pack(k), pack(v)) if packed else (k, v)
    got = np.asarray(
        jax.jit(native_kernels.paged_decode, static_argnums=(5,))(q, kc, vc, pages, kv_len, layer)
    )
    f32 = lambda a: np.asarray(a.astype(jnp.float32))  # noqa: E731
    ref = _reference_decode(f32(q), f32(k), f32(v), pages, kv_len, layer)
    assert np.all(got[0] == 0)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("H,K,X,Z", [(8, 8, 64, 16), (4, 2, 96, 8), (2, 2, 48, 16)])
def test_native_prefill_blocks_equal_per_token_decode(packed, H, K, X, Z):
    """The prefill kernel (a row's consecutive tokens in blocks of 16 sharing each page) gives
    exactly what the decode kernel gives each token with its row's page table: runs longer
    than a block, one-token rows, padding tokens (kv_len 0) between them, a row seen twice,
    partial pages, out-of-range page ids skipped; a row id outside the table is an error."""
    if not native_kernels.available():
        pytest.skip("no C++ compiler: the engine uses the pure-JAX kernel")
    rng = np.random.default_rng(5)
    R, P, W, N, layer = 4, 96, 6, 2, 1
    pages = rng.permutation(np.arange(P))[: R * W].reshape(R, W).astype(np.int32)
    pages[2, 1] = -1  # skipped, as if absent
    runs = [(0, 0, 37), (1, 5, 1), (None, 0, 3), (2, 2, 20), (3, 0, W * Z + 4), (0, 40, 2)]
    row_T, len_T = [], []
    for row, start, n in runs:  # (row, first position, tokens); None: padding
        row_T += [0 if row is None else row] * n
        len_T += [0] * n if row is None else list(range(start + 1, start + n + 1))
    row_T, len_T = np.asarray(row_T, np.int32), np.asarray(len_T, np.int32)
    dt = jnp.bfloat16 if packed else jnp.float32
    k = jnp.asarray(rng.normal(size=(N, P, Z, K, X)), dt)
    v = jnp.asarray(rng.normal(size=(N, P, Z, K, X)), dt)
    q = jnp.asarray(2 * rng.normal(size=(len(row_T), H, X)), jnp.float32)
    kc, vc = (pack(k), pack(v)) if packed else (k, v)
    prefill = jax.jit(native_kernels.paged_prefill, static_argnums=(6,))
    got = np.asarray(prefill(q, kc, vc, pages, row_T, len_T, layer))
    decode = jax.jit(native_kernels.paged_decode, static_argnums=(5,))
    want = np.asarray(decode(q, kc, vc, pages[row_T], len_T, layer))
    np.testing.assert_array_equal(got, want)
    assert np.all(got[len_T == 0] == 0)
    with pytest.raises(Exception, match="row out of range"):
        np.asarray(prefill(q, kc, vc, pages, np.full_like(row_T, R), len_T, layer))


@pytest.mark.parametrize("packed", [False, True])
def test_native_kernels_take_and_give_bfloat16(packed):
    """A bfloat16 query goes in as it is and the output comes back bfloat16: exactly the
    float32 query's output rounded as XLA rounds it (decode and prefill); float16 and other
    query types are computed in float32."""
    if not native_kernels.available():
        pytest.skip("no C++ compiler: the engine uses the pure-JAX kernel")
    rng = np.random.default_rng(9)
    G, H, K, X, Z, P, W, N = 6, 4, 2, 64, 16, 32, 3, 1
    pages = rng.permutation(np.arange(P))[: G * W].reshape(G, W).astype(np.int32)
    kv_len = np.array([0, 1, 17, 48, 30, 5], np.int32)
    dt = jnp.bfloat16 if packed else jnp.float32
    k = jnp.asarray(rng.normal(size=(N, P, Z, K, X)), dt)
    v = jnp.asarray(rng.normal(size=(N, P, Z, K, X)), dt)
    kc, vc = (pack(k), pack(v)) if packed else (k, v)
    q16 = jnp.asarray(rng.normal(size=(G, H, X)), jnp.bfloat16)
    decode = jax.jit(native_kernels.paged_decode, static_argnums=(5,))
    prefill = jax.jit(native_kernels.paged_prefill, static_argnums=(6,))
    want = decode(q16.astype(jnp.float32), kc, vc, pages, kv_len, 0)
    assert want.dtype == jnp.float32
    for got in (
        decode(q16, kc, vc, pages, kv_len, 0),
        prefill(q16, kc, vc, pages, np.arange(G, dtype=np.int32), kv_len, 0),
    ):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint16), np.asarray(want.astype(jnp.bfloat16)).view(np.uint16)
        )
    half = decode(q16.astype(jnp.float16), kc, vc, pages, kv_len, 0)
    assert half.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(half), np.asarray(want))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_native_prefill_equals_pure_jax(dtype):
    """Prefill chunks through the native kernel (each token one query over its row's pages):
    several rows per step, chunks split across steps and decodes in the same steps give the
    tokens and log-probabilities of the pure-JAX attention."""
    import dataclasses

    from flax import nnx

    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.serve.engine import Engine
    from mlx_sched.serve.request import SamplingParams
    from models import ModelConfig, Transformer

    if not native_kernels.available():
        pytest.skip("no C++ compiler: the engine uses the pure-JAX kernel")
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=128, dtype=dtype)  # fmt: skip
    model = Transformer(cfg, nnx.Rngs(0))
    serve = ServeConfig(page_size=4, num_pages=128, max_seqs=8, token_budget=32,
                        max_prefill_rows=3, packed_matmuls=False)  # fmt: skip
    native = Engine(model, serve)
    plain = Engine(model, dataclasses.replace(serve, native_kernels=False))
    assert native.runner.kernel.native and not plain.runner.kernel.native
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(1, 512, n))) for n in (3, 45, 9, 30, 1, 17)]
    sp = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=True)
    a, b = native.generate(prompts, sp), plain.generate(prompts, sp)
    assert any(r.num_prefill_seqs > 1 for r in native.step_records)
    assert any(r.num_prefill_seqs and r.num_decode for r in native.step_records)
    assert [o.outputs[0] for o in a] == [o.outputs[0] for o in b]
    tol = 1e-4 if dtype == "float32" else 5e-2
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.request.seqs[0].logprobs, y.request.seqs[0].logprobs, atol=tol)
