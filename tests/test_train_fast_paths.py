"""The train step's own gradients (dot, attention, RoPE) against plain autodiff and naive
references, and the compiled bf16 step keeping every matmul in bf16 (XLA:CPU's fast path)."""

import functools
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlx_sched.train import loop
from mlx_sched.train.steps import train_step
from models import Transformer
from models.attention_core import QUERY_BLOCK, causal_attention
from models.layers import apply_rope, dot, rope_tables

EQS = {  # equation: (x shape, w shape), as the model uses them
    "td,df->tf": ((48, 16), (16, 24)),
    "tf,fd->td": ((48, 24), (24, 16)),
    "td,dhx->thx": ((48, 16), (16, 4, 8)),
    "thx,hxd->td": ((48, 4, 8), (4, 8, 16)),
    "td,vd->tv": ((48, 16), (40, 16)),
}


def _grads(f, eq, x, w):
    loss = lambda x, w: jnp.sum(jnp.sin(f(eq, x, w).astype(jnp.float32)))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("eq", sorted(EQS))
def test_dot_gradients_match_autodiff(eq):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, EQS[eq][0])
    w = jax.random.normal(kw, EQS[eq][1])
    plain = lambda eq, x, w: jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)
    ref = _grads(plain, eq, x, w)
    f32 = _grads(lambda eq, x, w: dot(eq, x, w, jnp.float32), eq, x, w)
    bf16 = _grads(lambda eq, x, w: dot(eq, x, w, jnp.bfloat16), eq, x, w)
    for r, a, b in zip(ref, f32, bf16, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5)
        # bf16 operands and cotangent, float32 accumulation; gradients keep the input dtype
        assert b.dtype == jnp.float32
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(np.asarray(b), np.asarray(r), atol=0.05 * scale)


@pytest.mark.parametrize("L", [QUERY_BLOCK * 2, QUERY_BLOCK + 5])
def test_attention_matches_naive_and_its_gradient_autodiff_of_naive(L, naive_attention):
    B, H, K, X = 2, 4, 2, 8
    ks = jax.random.split(jax.random.key(1), 4)
    q, do = (jax.random.normal(k, (B, L, H, X)) for k in (ks[0], ks[3]))
    k, v = (jax.random.normal(k, (B, L, K, X)) for k in (ks[1], ks[2]))
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))

    def dense(q, k, v):  # the plain masked softmax, differentiated by JAX
        kf = jnp.repeat(k, H // K, axis=2)
        vf = jnp.repeat(v, H // K, axis=2)
        s = jnp.einsum("blhx,bthx->bhlt", q, kf) / np.sqrt(X)
        s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -jnp.inf)
        return jnp.einsum("bhlt,bthx->blhx", jax.nn.softmax(s, axis=-1), vf)

    np.testing.assert_allclose(
        np.asarray(causal_attention(q, k, v, pos, pos, ordered=True)),
        naive_attention(*(np.asarray(a) for a in (q, k, v))),
        atol=1e-5,
    )
    ref = jax.vjp(dense, q, k, v)[1](do)
    for ordered in (False, True):
        f = lambda q, k, v, ordered=ordered: causal_attention(q, k, v, pos, pos, ordered=ordered)
        grads = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))(q, k, v, do)
        for a, r in zip(grads, ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5)


def test_bf16_attention_gradients_close_to_f32():
    B, L, H, K, X = 2, QUERY_BLOCK * 2, 4, 2, 16
    ks = jax.random.split(jax.random.key(2), 4)
    shapes = [(B, L, H, X), (B, L, K, X), (B, L, K, X), (B, L, H, X)]
    args = [jax.random.normal(k, s) for k, s in zip(ks, shapes, strict=True)]
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))

    def grads(dtype):
        q, k, v, do = (a.astype(dtype) for a in args)
        f = lambda q, k, v: causal_attention(q, k, v, pos, pos, ordered=True)
        return jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))(q, k, v, do)

    for a, r in zip(grads(jnp.bfloat16), grads(jnp.float32), strict=True):
        assert a.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r), atol=0.03 * scale)


def test_rope_gradient_is_the_inverse_rotation():
    pos = np.arange(3, 3 + 40, dtype=np.int32)
    x = jax.random.normal(jax.random.key(3), (40, 4, 8))
    cos, sin = rope_tables(jnp.asarray(pos), 8, 10000.0)
    cos_np, sin_np = rope_tables(pos, 8, 10000.0)  # static positions: numpy constants
    assert isinstance(cos_np, np.ndarray)
    np.testing.assert_allclose(cos_np, np.asarray(cos), atol=1e-6)
    np.testing.assert_allclose(sin_np, np.asarray(sin), atol=1e-6)

    def formula(x):  # the rotation, differentiated by JAX
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos[:, None] + rotated * sin[:, None]

    loss = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)
    np.testing.assert_allclose(
        np.asarray(loss(lambda x: apply_rope(x, cos, sin))), np.asarray(loss(formula)), atol=1e-5
    )


def test_ordered_context_matches_explicit_positions(tiny_cfg):
    """Without positions the model takes the ordered fast path (block-skipping attention,
    constant RoPE tables); with them the general one: same logits and gradients."""
    model = Transformer(tiny_cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    B, L = 2, QUERY_BLOCK * 2
    tokens = jax.random.randint(jax.random.key(4), (B, L), 0, 256)
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))

    def loss(params, pos):
        logits = nnx.merge(graphdef, params)(tokens, pos)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    fast, g_fast = jax.jit(jax.value_and_grad(lambda p: loss(p, None)))(params)
    slow, g_slow = jax.jit(jax.value_and_grad(lambda p: loss(p, pos)))(params)
    np.testing.assert_allclose(float(fast), float(slow), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_slow), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot selection")
def test_bf16_train_step_runs_every_matmul_in_bf16(tiny_cfg):
    """XLA:CPU runs a bf16 dot on its fast (AMX) path only when both operands are bf16 and
    the left one contracts its minor dimension; otherwise it converts them to float32."""
    from dataclasses import replace

    cfg = replace(tiny_cfg, dtype="bfloat16")
    tc = loop.TrainConfig(steps=10, warmup_steps=1, batch_size=2, seq_len=QUERY_BLOCK * 2)
    tx = loop.make_optimizer(tc)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    step = jax.jit(functools.partial(train_step, graphdef, tx, 0))
    tokens = jnp.zeros((tc.batch_size, tc.seq_len + 1), jnp.int32)
    hlo = step.lower(params, tx.init(params), tokens, jnp.int32(0)).compile().as_text()
    shapes = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    dots = re.findall(r"= \w+\[[^\]]*\]\{[^}]*\} dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    assert len(dots) > 20
    assert {(shapes[a], shapes[b]) for a, b in dots} == {("bf16", "bf16")}


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_retain_freed_memory_in_a_fresh_process():
    code = "from mlx_sched.train.memory import retain_freed_memory; print(retain_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_fast_paths_equal_single_device_without_gathers(tiny_cfg, dtype):
    """Block-skipping attention and the custom gradients under data x tensor parallelism:
    the same step as on one device, and no layout constraint turned into an all-gather."""
    from dataclasses import replace

    import sharding

    cfg = replace(tiny_cfg, dtype=dtype)
    tc = loop.TrainConfig(steps=10, warmup_steps=1)
    tx = loop.make_optimizer(tc)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    batch = jax.random.randint(jax.random.key(1), (8, QUERY_BLOCK * 2 + 1), 0, 256)
    step = functools.partial(train_step, graphdef, tx, 0)
    _, _, ref = jax.jit(step)(params, tx.init(params), batch, jnp.int32(0))

    mesh = sharding.make_mesh({"data": 4, "tensor": 2})
    p_sh = sharding.state_shardings(mesh, params)
    o_sh = sharding.optimizer_shardings(tx, params, p_sh, mesh)
    b_sh = sharding.named_sharding(mesh, ("act_batch", None))
    sp = sharding.place(params, p_sh)
    with jax.set_mesh(mesh):
        so = jax.jit(tx.init, out_shardings=o_sh)(sp)
        fn = jax.jit(step, in_shardings=(p_sh, o_sh, b_sh, None), out_shardings=(p_sh, o_sh, None))
        args = (sp, so, jax.device_put(batch, b_sh), jnp.int32(0))
        hlo = fn.lower(*args).compile().as_text()
        _, _, out = fn(*args)
    gathers = [line for line in hlo.splitlines() if re.search(r"\sall-gather(-start)?\(", line)]
    assert not [line for line in gathers if "layout_constraint" in line]
    tol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(float(out["loss"]), float(ref["loss"]), rtol=tol)
    np.testing.assert_allclose(float(out["grad_norm"]), float(ref["grad_norm"]), rtol=10 * tol)
