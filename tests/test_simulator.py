"""The simulation's fast paths change nothing: every policy simulates a pressured two-client
trace to the same steps, times and latencies as before them, and each rewritten piece agrees
with the straightforward rule it replaces."""

import numpy as np
import pytest

from mlx_sched.lab import workload
from mlx_sched.lab.replay import replay
from mlx_sched.lab.simulator import sim_engine
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.request import RequestError, SamplingParams, validate_prompt
from models import ModelConfig

MC = ModelConfig(max_seq_len=1024)

# (policy, slice_len, preemption, policy_args, steps, simulated s, output tokens, summed TTFT,
#  preemptions), measured before the fast paths (the engine at 303b2c0), recompute and swap
# preemption included: a change here is a change of behaviour
BEFORE = [
    ("fcfs", 1, "recompute", {}, 1653, 2.628234104, 9627, 3.691809974, 32),
    ("fcfs", 8, "swap", {}, 302, 2.643664826, 9627, 4.052456583, 24),
    ("sarathi", 4, "recompute", {}, 506, 2.639970618, 9627, 4.225779114, 26),
    ("sarathi", 1, "recompute", {"variant": "prefill_first"}, 1718, 2.700751323, 9627, 4.244795837,
     38),
    ("mlfq", 4, "swap", {}, 506, 2.629197748, 9627, 0.975821581, 19),
    ("vtc", 1, "recompute", {}, 2149, 3.059960311, 9627, 15.266238740, 0),
    ("priority", 4, "recompute", {"preempt": True}, 508, 2.649316135, 9627, 3.951810220, 31),
    ("slice", 8, "recompute", {"slice_tokens": 16}, 308, 2.621474946, 9627, 1.637394194, 0),
    ("static", 8, "recompute", {}, 375, 3.334098663, 9627, 31.244526608, 0),
]  # fmt: skip


@pytest.mark.parametrize("case", BEFORE, ids=[f"{c[0]}-S{c[1]}-{c[2]}" for c in BEFORE])
def test_policies_simulate_as_before_the_fast_paths(case):
    policy, S, preemption, args, steps, sim_s, tokens, ttft, preemptions = case
    specs = [
        workload.ClientSpec("a", 30.0, 60, "sharegpt", 0.5),
        workload.ClientSpec("b", 10.0, 20, "alpaca", 1.0, priority=1),
    ]
    trace = workload.client_trace(specs, 1024, seed=0)
    cfg = ServeConfig(
        page_size=8,
        num_pages=2000 if policy in ("slice", "static") else 300,
        max_seqs=16,
        token_budget=128,
        slice_len=S,
        policy=policy,
        policy_args=args,
        preemption=preemption,
        history=-1,
    )
    e = sim_engine(MC, cfg)
    got_s = replay(e, trace)
    ms = e.request_metrics()
    assert e.runner.steps == steps
    assert got_s == pytest.approx(sim_s, abs=1e-8)
    assert e.totals.output_tokens == tokens
    assert sum(m.get("ttft", 0) for m in ms) == pytest.approx(ttft, abs=1e-7)
    assert sum(m["preemptions"] for m in ms) == preemptions
    e.pool.check()


def test_kv_occupancy_counts_each_page_once_as_full_as_its_fullest_holder():
    rng = np.random.default_rng(0)
    cfg = ServeConfig(page_size=8, num_pages=400, max_seqs=8, token_budget=64)
    e = sim_engine(MC, cfg)
    for i in range(12):
        e.add_request([1 + i % 3] * int(rng.integers(20, 120)), SamplingParams(max_tokens=40, n=2))
    for _ in range(30):
        e.step()
        Z, filled = cfg.page_size, {}  # the page-by-page rule
        for req in e.sched.running:
            for s in req.live_seqs:
                for i, p in enumerate(s.pages):
                    filled[p] = max(filled.get(p, 0), min(Z, max(0, s.num_computed - i * Z)))
        assert e.sched.kv_occupancy() == (e.pool.num_in_use, sum(filled.values()))


def test_admission_looks_at_the_head_of_a_long_queue_only():
    cfg = ServeConfig(page_size=8, num_pages=400, max_seqs=4, token_budget=64)
    e = sim_engine(MC, cfg)
    for _ in range(50):
        e.add_request([1] * 10, SamplingParams(max_tokens=5))
    plan = StepPlan()
    head = e.policy.waiting_head(e.sched, plan)
    assert head == list(e.sched.waiting)[:5]  # 4 free slots, and one that cannot fit
    e.step()
    assert len(e.sched.running) == 4


def test_plan_split_is_decodes_then_prefills():
    cfg = ServeConfig(page_size=8, num_pages=400, max_seqs=8, token_budget=64)
    e = sim_engine(MC, cfg)
    for n in (5, 30, 12):
        e.add_request([1] * n, SamplingParams(max_tokens=20))
    for _ in range(3):
        plan = e.policy.schedule(e.sched, e.clock())
        assert plan.split() == (plan.decodes, plan.prefills)
        result = e.runner.run(plan)
        e.sched.release(plan)
        e._postprocess(plan, result)


def _commit_by_token(tokens, p0, n, samples, sequential, stops, limit):
    """The engine's token-by-token rule: (tokens appended, finish reason, num_computed)."""
    L0, out, reason = len(tokens), [], None
    first = p0 + n - len(samples)
    picked = range(len(samples)) if sequential else [
        j for j in range(len(samples)) if first + j + 1 - L0 >= 0
    ]  # fmt: skip
    for j in picked:
        out.append(samples[j])
        if samples[j] in stops:
            reason = "stop"
        elif L0 + len(out) >= limit:
            reason = "length"
        if reason:
            break
    computed = len(samples) if sequential else n
    taken = len(picked) > 0
    return out, reason, min(p0 + computed, L0 + len(out) - 1 if taken else p0 + computed)


@pytest.mark.parametrize("seed", range(4))
def test_commit_keeps_the_tokens_the_token_by_token_rule_keeps(seed):
    rng = np.random.default_rng(seed)
    cfg = ServeConfig(page_size=4, num_pages=2000, max_seqs=64, token_budget=64, eos_token=7)
    e = sim_engine(MC, cfg)
    for case in range(300):
        prompt = [int(t) for t in rng.integers(8, 200, rng.integers(1, 12))]
        stop_tokens = tuple(int(t) for t in rng.choice([3, 5, 9], rng.integers(0, 3)))
        sp = SamplingParams(
            max_tokens=int(rng.integers(1, 8)),
            stop_tokens=stop_tokens,
            ignore_eos=bool(rng.random() < 0.5),
        )
        rid = e.add_request(prompt, sp, request_id=f"c{seed}-{case}")
        req = e.requests[rid]
        e.sched.admit(req, 0.0)
        seq = req.seqs[0]
        generated = int(rng.integers(0, sp.max_tokens))
        seq.tokens += [int(t) for t in rng.integers(8, 200, generated)]
        sequential = bool(rng.random() < 0.5)
        if sequential:  # a slice entry: n iterations from the last token
            seq.num_computed = len(seq.tokens) - 1
            n = int(rng.integers(1, 5))
            samples = [int(t) for t in rng.choice([3, 5, 7, 9, 11, 12], n)]
        else:  # a prefill chunk (one sample) or a decode with drafts (n samples)
            seq.num_computed = int(rng.integers(0, len(seq.tokens)))
            k = int(rng.integers(1, 4))  # samples: 1 (a chunk, to the end or not) or drafts
            n = int(rng.integers(1, len(seq.tokens) - seq.num_computed + 1)) if k == 1 else k
            samples = [int(t) for t in rng.choice([3, 5, 7, 9, 11, 12], k)]
        plan = StepPlan()
        assert e.sched.reserve(seq, n, plan)
        stops = set(sp.stop_tokens) | (set() if sp.ignore_eos else {7})
        limit = req.prompt_len + sp.max_tokens
        tokens0, p0 = list(seq.tokens), seq.num_computed
        want, reason, computed = _commit_by_token(tokens0, p0, n, samples, sequential, stops, limit)
        new = {}
        e._commit(seq, n, samples, None, sequential, new, 1.0)
        assert seq.tokens == tokens0 + want and new[seq] == want
        assert seq.token_times[-len(want) :] == [1.0] * len(want) if want else True
        assert (seq.done, seq.finish_reason) == (reason is not None, reason)
        assert seq.num_computed == computed
        e.abort(rid)


def test_prompts_are_validated_the_same_on_the_fast_path():
    assert validate_prompt([1, 2, 3], 10, 100, 5) == [1, 2, 3]
    assert validate_prompt(np.array([1, 2], np.int64), 10, 100, 5) == [1, 2]
    assert validate_prompt([np.int32(4), 5], 10, 100, 5) == [4, 5]
    for bad, match in (
        ([1, True], "got True"),
        ([1, 2.0], "got 2.0"),
        ([1, 10], r"outside the vocabulary \[0, 10\): \[10\]"),
        ([-1, 3], r"outside the vocabulary \[0, 10\): \[-1\]"),
        ([], "empty prompt"),
        ("abc", "tokenize text first"),
    ):
        with pytest.raises(RequestError, match=match):
            validate_prompt(bad, 10, 100, 5)
