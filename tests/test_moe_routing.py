"""MoE routers: hand-worked capacity tables (with and without BPR), losses, expert choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import routing


def _slots(r: routing.Routing) -> dict:
    """token -> sorted [(expert, slot)] of group 0, from the dispatch mask."""
    d = np.asarray(r.dispatch_GSEC[0])
    return {s: sorted(map(tuple, np.argwhere(d[s]).tolist())) for s in range(d.shape[0])}


def _top1_logits():
    """6 tokens, 2 experts: first choices [0, 0, 0, 1, 0, 1] with these probabilities."""
    choice = np.array([0, 0, 0, 1, 0, 1])
    p = np.array([0.6, 0.7, 0.9, 0.8, 0.95, 0.55])
    logits = np.zeros((1, 6, 2), np.float32)
    logits[0, np.arange(6), choice] = np.log(p)
    logits[0, np.arange(6), 1 - choice] = np.log(1 - p)
    return jnp.asarray(logits), p


def test_capacity_overflow_in_token_order():
    logits, p = _top1_logits()
    r = routing.top_k_routing(logits, k=1, capacity=2)
    # expert 0 is chosen by tokens 0, 1, 2, 4: the first two in token order fit
    assert _slots(r) == {0: [(0, 0)], 1: [(0, 1)], 2: [], 3: [(1, 0)], 4: [], 5: [(1, 1)]}
    np.testing.assert_allclose(r.assigned_GE, [[4, 2]])
    combine = np.asarray(r.combine_GSEC[0]).sum(axis=(1, 2))
    np.testing.assert_allclose(combine, p * np.array([1, 1, 0, 1, 0, 1]), rtol=1e-6)
    assert float(routing.dropped_fraction(r.dispatch_GSEC)) == pytest.approx(2 / 6)


def test_capacity_overflow_with_batch_priority():
    logits, _ = _top1_logits()
    r = routing.top_k_routing(logits, k=1, capacity=2, batch_priority=True)
    # priority 4 (.95), 2 (.9), 3 (.8), 1 (.7), 0 (.6), 5 (.55): expert 0 keeps 4 then 2
    assert _slots(r) == {0: [], 1: [], 2: [(0, 1)], 3: [(1, 0)], 4: [(0, 0)], 5: [(1, 1)]}


def test_top2_places_all_first_choices_before_second_choices():
    logits = jnp.asarray([[[2.0, 1, 0], [2, 0, 1], [1, 2, 0], [2, 1, 0]]])
    r = routing.top_k_routing(logits, k=2, capacity=2)
    # first choices: e0 <- t0, t1 (t3 overflows), e1 <- t2; then second choices:
    # t0 -> e1 slot 1, t1 -> e2 slot 0, t2 -> e0 (position 3: full), t3 -> e1 (position 2: full)
    assert _slots(r) == {0: [(0, 0), (1, 1)], 1: [(0, 1), (2, 0)], 2: [(1, 0)], 3: []}
    np.testing.assert_allclose(r.assigned_GE, [[4, 3, 1]])


def test_topk_softmax_gates_renormalise_and_equal_softmax_over_chosen_logits():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 6))
    probs = jax.nn.softmax(logits, -1)
    idx, p = routing.top_k_experts(probs, 2)
    ref_val, ref_idx = jax.lax.top_k(probs, 2)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(p, ref_val)
    g = routing.gate_values(logits, idx, p, "topk_softmax")
    np.testing.assert_allclose(g, p / p.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(routing.gate_values(logits, idx, p, "softmax"), p)


def test_gshard_random_second_expert_policy():
    logits = jnp.log(jnp.asarray([[[0.6, 0.35, 0.05], [0.5, 0.45, 0.05]]]))
    idx, p = routing.top_k_experts(jax.nn.softmax(logits), 2)
    g2 = np.asarray(p[0, :, 1] / p[0].sum(-1))
    np.testing.assert_allclose(g2, [0.35 / 0.95, 0.45 / 0.95], rtol=1e-5)
    # the second expert is kept when uniform < 2 * g2 = (0.737, 0.947)
    for u, kept in [(0.0, [2, 2]), (0.7, [2, 2]), (0.8, [1, 2]), (0.9, [1, 2]), (0.95, [1, 1])]:
        r = routing.top_k_routing(logits, 2, 4, uniform_GS=jnp.full((1, 2), u))
        assert [len(v) for v in _slots(r).values()] == kept, (u, g2)


def test_expert_choice_gives_every_expert_exactly_capacity_tokens():
    logits = jax.random.normal(jax.random.key(1), (3, 16, 4)) * 2
    r = routing.expert_choice_routing(logits, capacity=6)
    d = np.asarray(r.dispatch_GSEC)
    np.testing.assert_array_equal(d.sum(axis=(1, 3)), 6)  # every expert: exactly C tokens
    np.testing.assert_array_equal(d.sum(axis=1), 1)  # every slot holds exactly one token
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for g in range(3):
        for e in range(4):
            chosen = set(np.argwhere(d[g, :, e].sum(-1)).ravel())
            assert chosen == set(np.argsort(-probs[g, :, e])[:6])
    np.testing.assert_allclose(np.asarray(r.combine_GSEC).sum(-1), (d.sum(-1) * probs), rtol=1e-6)
    assert float(routing.load_imbalance(r.assigned_GE.sum(0))) == 1.0


def test_aux_loss_is_one_when_balanced_and_E_on_collapse():
    E = 4
    balanced = 5.0 * jax.nn.one_hot(jnp.arange(16) % E, E)[None]
    assert float(routing.load_balancing_loss(jax.nn.softmax(balanced))) == pytest.approx(1.0)
    collapsed = jnp.zeros((2, 16, E)).at[..., 0].set(50.0)
    assert float(routing.load_balancing_loss(jax.nn.softmax(collapsed))) == pytest.approx(E)
    collapsed8 = jnp.zeros((1, 16, 8)).at[..., 3].set(50.0)
    assert float(routing.load_balancing_loss(jax.nn.softmax(collapsed8))) == pytest.approx(8)


def test_z_loss_and_entropy_of_zero_logits():
    zero = jnp.zeros((2, 5, 8))
    assert float(routing.z_loss(zero)) == pytest.approx(4.3241, abs=1e-4)
    assert float(routing.z_loss(zero)) == pytest.approx(np.log(8) ** 2, rel=1e-6)
    assert float(routing.router_entropy(jax.nn.softmax(zero))) == pytest.approx(np.log(8))
    assert float(routing.load_imbalance(jnp.asarray([1.0, 1.0, 4.0, 2.0]))) == pytest.approx(2.0)


def test_capacity_formula():
    from models.moe_config import MoEConfig

    switch = MoEConfig(num_experts=8)
    assert switch.capacity(128, 1.25) == 20 and switch.capacity(128, 1.0) == 16
    assert switch.capacity(8, 1.0) == 4  # min_capacity
    assert switch.capacity(8, 100.0) == 8  # never more slots than tokens in the group
    assert MoEConfig(num_experts=8, top_k=2).capacity(128, 1.25) == 40  # cf * k * S / E
    assert MoEConfig(num_experts=8, router="expert_choice").capacity(128, 2.0) == 32
    assert MoEConfig(num_experts=6, min_capacity=1).capacity(10, 1.0) == 2  # ceil(10 / 6)
