"""FlexGen-style offload: offloaded generate == full-recompute greedy, the device budget's
accounting, the cost-model search against brute force, bad input."""

import dataclasses
import itertools

import jax
import numpy as np
import pytest
from flax import nnx

from mlx_sched.offload import (
    BudgetError,
    DeviceBudget,
    OffloadedModel,
    Placement,
    cost,
    generate,
    study,
    tiers,
)
from models import ConfigError, ModelConfig, Transformer
from models import generate as reference

CFG = ModelConfig(
    vocab_size=264,
    d_model=64,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    d_ff=128,
    max_seq_len=128,
    init_std=0.3,  # logits far from uniform: greedy tokens vary
)
MAX_TOKENS = 6


def _prompts(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, 256, int(k)))) for k in rng.integers(2, 12, n)]


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, nnx.Rngs(0))


@pytest.fixture(scope="module")
def expected(model):
    return reference.generate(model, _prompts(), MAX_TOKENS)


def _sizes(prompts=None, max_tokens=MAX_TOKENS):
    prompts = prompts or _prompts()
    Lp = max(map(len, prompts))
    return len(prompts), Lp, Lp + max_tokens - 1


# -- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights,kv",
    [(3, 3), (0, 3), (3, 0), (0, 0), (1, 2)],
    ids=["all_device", "weights_host", "kv_host", "all_host", "mixed"],
)
def test_offloaded_generate_equals_full_recompute(model, expected, weights, kv):
    out = generate(model, _prompts(), MAX_TOKENS, Placement.first(3, weights, kv))
    assert out.tokens == expected
    assert len(set(map(tuple, expected))) > 1 and len(set(expected[0])) > 1  # not degenerate
    assert out.layer_s.shape == (MAX_TOKENS - 1, 3) and (out.layer_s > 0).all()
    assert len(out.step_s) == MAX_TOKENS - 1 and out.prefill_s > 0


def test_moe_model_offloaded_equals_full_recompute():
    moe = dict(num_experts=4, top_k=2, gates="topk_softmax", every=2, offset=1)
    cfg = ModelConfig.from_dict({**CFG.to_dict(), "n_layers": 2, "moe": moe})
    m = Transformer(cfg, nnx.Rngs(1))
    prompts = _prompts(seed=1)
    out = generate(m, prompts, 4, Placement(weights_on_device=(True, False), kv_on_device=(0, 1)))
    assert out.tokens == reference.generate(m, prompts, 4)


def test_host_tier_weights_live_in_the_host_memory_kind(model):
    _, host_kind = tiers.memory_kinds()
    om = OffloadedModel(model, Placement.first(3, 1, 3))
    for leaf in jax.tree.leaves(om.weights[2]):
        if host_kind is None:
            assert isinstance(leaf, np.ndarray)
        else:
            assert leaf.sharding.memory_kind == host_kind
    for leaf in jax.tree.leaves(om.weights[0]):
        assert leaf.sharding.memory_kind != host_kind


# -- the device budget -------------------------------------------------------------------------


def test_device_budget_counts_and_refuses():
    b = DeviceBudget(100)
    b.reserve("a", 60)
    b.reserve("b", 40)
    assert b.resident_bytes == 100 and b.peak_bytes == 100
    with pytest.raises(BudgetError, match="c needs .* cap"):
        b.reserve("c", 1)
    b.release("a")
    b.reserve("c", 10)
    assert b.resident_bytes == 50 and b.peak_bytes == 100
    with pytest.raises(ValueError, match="already resident"):
        b.reserve("c", 1)


def test_model_larger_than_the_budget_generates_within_the_cap(model, expected):
    B, Lp, T = _sizes()
    placement = Placement.first(3, 0, 0)
    need = tiers.required_bytes(CFG, placement, B, Lp, T)
    weights = tiers.head_bytes(CFG) + sum(tiers.layer_bytes(CFG, i) for i in range(3))
    assert weights > need  # the model alone would not fit the device tier
    out = generate(model, _prompts(), MAX_TOKENS, placement, cap_bytes=need)
    assert out.tokens == expected
    assert out.peak_bytes == out.required_bytes == need


@pytest.mark.parametrize("weights,kv", [(3, 3), (1, 2), (2, 0)])
def test_peak_resident_bytes_are_counted_exactly(model, weights, kv):
    B, Lp, T = _sizes()
    placement = Placement.first(3, weights, kv)
    need = tiers.required_bytes(CFG, placement, B, Lp, T)
    out = generate(model, _prompts(), MAX_TOKENS, placement, cap_bytes=need)
    assert out.peak_bytes == need
    streamed = tiers.streamed_bytes(CFG, placement, B, T)
    resident = sum(tiers.layer_bytes(CFG, i) for i in range(weights))
    resident += kv * tiers.kv_bytes(CFG, B, T)
    fixed = tiers.head_bytes(CFG) + tiers.activation_bytes(CFG, B, Lp, T)
    pairs = zip(streamed, streamed[1:] + [0], strict=True)  # computing + prefetched
    assert need == fixed + resident + max(a + b for a, b in pairs)


def test_placement_over_the_cap_is_refused_in_one_line(model):
    B, Lp, T = _sizes()
    placement = Placement.first(3, 3, 3)
    need = tiers.required_bytes(CFG, placement, B, Lp, T)
    with pytest.raises(BudgetError) as err:
        generate(model, _prompts(), MAX_TOKENS, placement, cap_bytes=need - 1)
    msg = str(err.value)
    assert "\n" not in msg and "needs" in msg and "cap" in msg and "least any placement" in msg


# -- the cost model and the search -------------------------------------------------------------

HW = cost.Hardware()


def test_search_keeps_everything_on_device_when_it_fits():
    best = cost.search(CFG, HW, batch=8, prompt_len=16, max_tokens=8, cap_bytes=None)
    assert best.placement == Placement.first(3, 3, 3)
    assert best.streamed_bytes == 0
    assert best.total_s == pytest.approx(best.prefill_s + 7 * best.token_s)
    assert best.token_s == pytest.approx(sum(best.layer_s))


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 0.95])
def test_search_offloads_under_a_small_cap_and_minimizes_its_cost(fraction):
    B, Lp, G = 8, 16, 8
    full = cost.predict(CFG, HW, Placement.first(3, 3, 3), B, Lp, G).required_bytes
    least = cost.predict(CFG, HW, Placement.first(3, 0, 0), B, Lp, G).required_bytes
    cap = least + int(fraction * (full - 1 - least))  # between the least and everything
    best = cost.search(CFG, HW, B, Lp, G, cap)
    assert best.required_bytes <= cap and best.streamed_bytes > 0
    # brute force over every per-layer subset of weights and KV, not only the search's space
    flags = list(itertools.product([False, True], repeat=3))
    preds = [cost.predict(CFG, HW, Placement(w, k), B, Lp, G) for w in flags for k in flags]
    fits = [p for p in preds if p.required_bytes <= cap]
    assert best.total_s == pytest.approx(min(p.total_s for p in fits))


def test_layer_cost_is_the_max_of_compute_read_and_write():
    B, T = 4, 32
    c = cost.layer_cost(CFG, HW, 0, Placement.first(3, 0, 0), B, 1, T)
    flops = cost.layer_flops(CFG, 0, B, 1, T)
    assert c.compute_s == pytest.approx(flops / HW.decode_flops_per_s + HW.layer_overhead_s)
    read = tiers.layer_bytes(CFG, 0) + tiers.kv_bytes(CFG, B, T)
    assert c.read_s == pytest.approx(read / HW.h2d_bytes_per_s)
    assert c.write_s == pytest.approx(tiers.kv_bytes(CFG, B, 1) / HW.d2h_bytes_per_s)
    assert c.seconds == max(c.compute_s, c.read_s, c.write_s)
    serial = cost.layer_cost(
        CFG, dataclasses.replace(HW, overlap=0.0), 0, Placement.first(3, 0, 0), B, 1, T
    )
    assert serial.seconds == pytest.approx(c.compute_s + c.read_s + c.write_s)
    resident = cost.layer_cost(CFG, HW, 0, Placement.first(3, 3, 3), B, 1, T)
    assert resident.read_s == resident.write_s == 0


def test_study_runs_and_checks_tokens():
    sc = study.StudyConfig(CFG, batch=2, prompt_len=4, max_tokens=3, cap_fractions=(1.0, 0.0))
    res = study.run(sc, log=lambda s: None)
    assert [r["tokens_equal_all_device"] for r in res["rows"]] == [True, True]
    first, last = res["rows"]
    assert (first["weights_on_device"], first["kv_on_device"]) == (3, 3)
    assert (last["weights_on_device"], last["kv_on_device"]) == (0, 0)
    assert last["peak_mib"] <= last["cap_mib"]
    assert "weights 3, KV 3" in study.table(res) and "weights 0, KV 0" in study.table(res)


def test_calibrate_measures_positive_constants(model):
    hw = cost.calibrate(model, batch=2, prompt_len=4, max_tokens=2, repeats=2, nbytes=1 << 20)
    for name in ("decode_flops_per_s", "prefill_flops_per_s", "h2d_bytes_per_s"):
        assert np.isfinite(getattr(hw, name)) and getattr(hw, name) > 0, name
    assert hw.d2h_bytes_per_s > 0 and hw.layer_overhead_s > 0 and 0 <= hw.overlap <= 1


# -- bad input ---------------------------------------------------------------------------------


def test_cap_below_one_streamed_layer_is_a_clear_error(model):
    B, Lp, T = _sizes()
    least = tiers.required_bytes(CFG, Placement.first(3, 0, 0), B, Lp, T)
    with pytest.raises(BudgetError, match="smaller than one layer streamed") as err:
        cost.search(CFG, HW, B, Lp, MAX_TOKENS, cap_bytes=least - 1)
    assert "\n" not in str(err.value)
    with pytest.raises(BudgetError, match="least any placement needs"):
        generate(model, _prompts(), MAX_TOKENS, Placement.first(3, 0, 0), cap_bytes=least - 1)


def test_bad_batch_and_arguments_are_clear_errors(model):
    with pytest.raises(ConfigError, match="batch 0"):
        generate(model, [], MAX_TOKENS, Placement.first(3, 3, 3))
    with pytest.raises(ConfigError, match="batch must be >= 1"):
        cost.search(CFG, HW, 0, 8, 8, None)
    with pytest.raises(ConfigError, match="max_tokens"):
        generate(model, _prompts(), 0, Placement.first(3, 3, 3))
    with pytest.raises(ConfigError, match="at least one token"):
        generate(model, [[1, 2], []], 2, Placement.first(3, 3, 3))
    with pytest.raises(ConfigError, match="placement has 2 layers"):
        generate(model, _prompts(), 2, Placement.first(2, 2, 2))
    with pytest.raises(ConfigError, match="weight flags"):
        Placement((True,), (True, False))
    with pytest.raises(BudgetError, match="> 0 bytes"):
        DeviceBudget(0)
