"""Speculative sampling keeps the target's distribution: the acceptance rules on device against
exact distributions, and the engine's generated tokens against the target model's exact
joint distribution of its first tokens, for good, bad and identical drafts.

Statistical checks are chi-square goodness-of-fit tests at a false-alarm rate of 1e-4 per
check (cells with an expected count below 5 are pooled); every sample is seeded, so a run
is deterministic and a pass is not luck that changes between runs.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import SamplingParams
from mlx_sched.serve.sampling import row_keys, sample, weights
from mlx_sched.speculative.acceptance import verify_chain
from models import ModelConfig, Transformer

FALSE_ALARM = 1e-4


def chi_square_ok(counts, probs) -> tuple[bool, float]:
    """Goodness of fit of observed counts to probabilities; cells expected < 5 pooled."""
    counts, probs = np.asarray(counts, float), np.asarray(probs, float)
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    assert np.all(obs[~keep] == 0), "samples where the target has no mass"
    obs, exp = obs[keep], exp[keep]
    p_value = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    return p_value > FALSE_ALARM, p_value


def _verify(p_logits_LV, q_KV, temperature, top_k, N, seed=0, q_rng=1):
    """N slots of the same chain: drafts drawn from q (numpy), verified by the rejection rule
    against p = filtered softmax(p_logits / temperature) -> (tokens [N, L], accepted [N])."""
    L, V = p_logits_LV.shape
    K = L - 1
    rng = np.random.default_rng(q_rng)
    drafts = np.stack([rng.choice(V, size=N, p=q_KV[j]) for j in range(K)], axis=1)
    logits = jnp.broadcast_to(jnp.asarray(p_logits_LV, jnp.float32), (N, L, V))
    T = jnp.full((N,), temperature, jnp.float32)
    k_ = jnp.full((N,), top_k, jnp.int32)
    tp = jnp.ones((N,), jnp.float32)
    seeds = jnp.repeat(jnp.arange(N, dtype=jnp.int32) + seed, L)
    pos = jnp.tile(jnp.arange(L, dtype=jnp.int32) + 10, N)
    zero = jnp.zeros((N * L,), jnp.int32)
    flat = logits.reshape(N * L, V)
    samples, _ = sample(
        flat, jnp.repeat(T, L), jnp.repeat(k_, L), jnp.repeat(tp, L), seeds, zero, pos
    )
    keys = row_keys(seeds, zero, pos).reshape(N, L)
    tok, acc = jax.jit(verify_chain)(
        logits,
        samples.reshape(N, L),
        jnp.asarray(drafts, jnp.int32),
        jnp.full((N,), K, jnp.int32),
        {"temperature": T, "top_k": k_, "top_p": tp},
        keys,
        jnp.broadcast_to(jnp.asarray(q_KV, jnp.float32), (N, K, V)),
    )
    return np.asarray(tok), np.asarray(acc), drafts


def _p(p_logits_LV, temperature, top_k):
    L = p_logits_LV.shape[0]
    w = weights(jnp.asarray(p_logits_LV, jnp.float32), jnp.full((L,), temperature),
                jnp.full((L,), top_k, jnp.int32), jnp.ones((L,)))  # fmt: skip
    w = np.asarray(w, np.float64)
    return w / w.sum(-1, keepdims=True)


@pytest.mark.parametrize(
    "q_kind,temperature,top_k",
    [("random", 1.0, 0), ("random", 0.7, 4), ("bad", 1.0, 0), ("same", 1.3, 0)],
)
def test_rejection_rule_keeps_the_target_distribution(q_kind, temperature, top_k):
    """Every emitted token, at every depth of the chain, has the target's distribution; the
    first draft is accepted with probability sum(min(p, q))."""
    V, L, N = 7, 3, 20000
    rng = np.random.default_rng(4)
    p_logits = rng.normal(size=(L, V)) * 1.5
    p = _p(p_logits, temperature, top_k)
    if q_kind == "same":
        q = p[: L - 1]
    elif q_kind == "bad":  # mass where p has little: acceptance near 0
        q = np.full((L - 1, V), 1e-3)
        q[np.arange(L - 1), p[: L - 1].argmin(-1)] = 1.0
        q /= q.sum(-1, keepdims=True)
    else:
        q = rng.dirichlet(np.ones(V), size=L - 1)
    tok, acc, drafts = _verify(p_logits, q, temperature, top_k, N)
    alpha = np.minimum(p[0], q[0]).sum()
    first_accepted = acc >= 1
    # acceptance of the first draft: binomial, 5 standard errors
    assert abs(first_accepted.mean() - alpha) <= 5 * np.sqrt(alpha * (1 - alpha) / N) + 1e-9
    if q_kind == "same":
        assert np.all(acc == L - 1)
    if q_kind == "bad":
        assert first_accepted.mean() < 0.05
    for depth in range(L):  # token at depth d exists when the d drafts before it were kept
        have = acc >= depth
        if have.sum() < 500:  # a bad draft seldom reaches the later depths
            continue
        counts = np.bincount(tok[have, depth], minlength=V)
        ok, pv = chi_square_ok(counts, p[depth])
        assert ok, (depth, pv, counts, p[depth])


def test_accepted_tokens_are_the_drafts_and_greedy_rows_match_the_argmax():
    V, L, N = 5, 4, 64
    rng = np.random.default_rng(0)
    p_logits = rng.normal(size=(L, V))
    q = rng.dirichlet(np.ones(V), size=L - 1)
    tok, acc, drafts = _verify(p_logits, q, 0.8, 0, N)
    for i in range(N):
        assert list(tok[i, : acc[i]]) == list(drafts[i, : acc[i]])
        if acc[i] < L - 1:
            assert tok[i, acc[i]] != drafts[i, acc[i]]  # the residual has no mass there
    # greedy rows: accepted while the draft is the argmax, then the argmax
    g = p_logits.argmax(-1)
    tok, acc, drafts = _verify(p_logits, q, 0.0, 0, N)
    for i in range(N):
        a = 0
        while a < L - 1 and drafts[i, a] == g[a]:
            a += 1
        assert acc[i] == a and list(tok[i, : a + 1]) == [*drafts[i, :a], g[a]]


# -- the engine -------------------------------------------------------------------------

VOCAB = 8
PROMPT = [3, 1, 4, 1, 5]
DEPTH = 3  # tokens generated per sequence, compared jointly with the target's distribution


def small(seed, d=16, layers=1):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=d, n_layers=layers, n_heads=2, n_kv_heads=1,
                      d_ff=2 * d, max_seq_len=32, init_std=0.5)  # fmt: skip
    return Transformer(cfg, nnx.Rngs(seed))


@pytest.fixture(scope="module")
def target():
    return small(11, d=32, layers=2)


def _exact_joint(model, temperature):
    """P(t1, ..., t_DEPTH | PROMPT) under the target, by enumeration."""
    out = {}
    for seq in itertools.product(range(VOCAB), repeat=DEPTH - 1):
        toks = jnp.asarray([PROMPT + list(seq)], jnp.int32)
        logits = np.asarray(model(toks, mode="eval")[0], np.float64) / temperature
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        n = len(PROMPT)
        prefix = sum(logp[n - 1 + j, seq[j]] for j in range(DEPTH - 1))
        for last in range(VOCAB):
            out[(*seq, last)] = np.exp(prefix + logp[n - 1 + DEPTH - 1, last])
    return out


def _negated(model):
    """The target with its output head negated and sharpened: its draws land where the
    target's mass is smallest (acceptance near 0)."""
    graphdef, state = nnx.split(model)
    bad = nnx.merge(graphdef, jax.tree.map(jnp.array, state))  # its own arrays
    bad.final_norm.scale[...] = -3.0 * bad.final_norm.scale[...]
    return bad


def _engine_samples(model, draft, temperature, n_requests, acceptance="rejection", kind=None,
                    tree_width=1):  # fmt: skip
    base = dict(page_size=4, num_pages=512, max_seqs=32, decode_buckets=(32,), token_budget=64,
                prefill_buckets=(64,), max_prefill_rows=2)  # fmt: skip
    spec = {}
    if kind is not None:
        spec = {"kind": kind, "gamma": 2, "acceptance": acceptance, "tree_width": tree_width}
        base["decode_widths"] = (1, 2 * tree_width + 1)
    engine = Engine(model, ServeConfig(**base, speculative=spec), draft_model=draft)
    sps = [SamplingParams(max_tokens=DEPTH, temperature=temperature, n=8, seed=i, ignore_eos=True)
           for i in range(n_requests)]  # fmt: skip
    outs = engine.generate([PROMPT] * n_requests, sps)
    counts: dict = {}
    for o in outs:
        for seq in o.outputs:
            counts[tuple(seq)] = counts.get(tuple(seq), 0) + 1
    assert engine.runner.compiles_since_warmup == 0 and engine.pool.num_in_use == 0
    recs = engine.step_records
    proposed = sum(r.spec_proposed for r in recs)
    accepted = sum(r.spec_accepted for r in recs)
    return counts, (accepted / proposed if proposed else None)


def _check_joint(target, counts, temperature):
    exact = _exact_joint(target, temperature)
    cells = sorted(exact)
    assert set(counts) <= set(cells)
    ok, pv = chi_square_ok([counts.get(c, 0) for c in cells], [exact[c] for c in cells])
    assert ok, f"p-value {pv:.2e}"


@pytest.mark.parametrize("draft_kind", ["random", "same"])
def test_engine_samples_have_the_target_distribution(target, draft_kind):
    """4,000 seeded sequences of 3 tokens through the engine with a draft model and the
    rejection rule: their joint distribution is the target's (512 cells)."""
    draft = small(5) if draft_kind == "random" else target
    counts, alpha = _engine_samples(target, draft, 1.0, 500, kind="draft_model")
    _check_joint(target, counts, 1.0)
    assert alpha is not None and alpha > 0
    if draft_kind == "same":
        assert alpha == 1.0


def test_engine_tree_samples_have_the_target_distribution(target):
    """Token trees (2 levels x 2 children, siblings i.i.d. from the draft) verified by
    SpecInfer's multi-step speculative sampling: the joint distribution is the target's."""
    counts, alpha = _engine_samples(target, small(5), 1.0, 500, kind="draft_model", tree_width=2)
    _check_joint(target, counts, 1.0)
    assert alpha > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "draft_kind,width,temperature",
    [("bad", 2, 1.0), ("same", 2, 0.7), ("lookup", 3, 1.0), ("random", 3, 0.6)],
)
def test_engine_tree_samples_have_the_target_distribution_more(
    target, draft_kind, width, temperature
):
    draft = {"bad": _negated(target), "random": small(5), "same": target}.get(draft_kind)
    kind = "prompt_lookup" if draft_kind == "lookup" else "draft_model"
    counts, _ = _engine_samples(target, draft, temperature, 500, kind=kind, tree_width=width)
    _check_joint(target, counts, temperature)


@pytest.mark.slow
@pytest.mark.parametrize(
    "draft_kind,acceptance,temperature",
    [("bad", "rejection", 1.0), ("random", "match", 1.0), ("lookup", "match", 0.8),
     ("random", "rejection", 0.6), ("off", "", 1.0)],
)  # fmt: skip
def test_engine_samples_have_the_target_distribution_more(
    target, draft_kind, acceptance, temperature
):
    draft = {"bad": _negated(target), "random": small(5)}.get(draft_kind)
    kind = {"lookup": "prompt_lookup", "off": None}.get(draft_kind, "draft_model")
    counts, alpha = _engine_samples(target, draft, temperature, 500, acceptance, kind)
    _check_joint(target, counts, temperature)
    if draft_kind == "bad":
        assert alpha < 0.1
    assert float(target.final_norm.scale[0]) > 0  # the target itself untouched


# -- token trees -------------------------------------------------------------------------


def _verify_tree(p_logits_LV, parent, q_of_node, temperature, N, q_rng=2):
    """N slots of one tree: node c's token drawn from q_of_node[c] (numpy), verified by
    SpecInfer's multi-step rule -> (tokens, accepted, path, node tokens)."""
    from mlx_sched.speculative.acceptance import verify_tree

    L, V = p_logits_LV.shape
    rng = np.random.default_rng(q_rng)
    toks = np.zeros((N, L), np.int32)
    for c in range(1, L):
        toks[:, c] = rng.choice(V, size=N, p=q_of_node[c])
    logits = jnp.broadcast_to(jnp.asarray(p_logits_LV, jnp.float32), (N, L, V))
    T = jnp.full((N,), temperature, jnp.float32)
    zk, one = jnp.zeros((N,), jnp.int32), jnp.ones((N,), jnp.float32)
    seeds = jnp.repeat(jnp.arange(N, dtype=jnp.int32), L)
    depth = np.zeros(L, np.int32)
    for c in range(1, L):
        depth[c] = depth[parent[c]] + 1
    pos = jnp.tile(jnp.asarray(depth + 11), N)
    zero = jnp.zeros((N * L,), jnp.int32)
    samples, _ = sample(logits.reshape(N * L, V), jnp.repeat(T, L), jnp.repeat(zk, L),
                        jnp.repeat(one, L), seeds, zero, pos)  # fmt: skip
    keys = row_keys(seeds, zero, pos).reshape(N, L)
    q = np.stack([q_of_node[c] for c in range(1, L)])
    tok, acc, path = jax.jit(verify_tree)(
        logits,
        samples.reshape(N, L),
        jnp.asarray(toks),
        jnp.broadcast_to(jnp.asarray(parent, jnp.int32), (N, L)),
        {"temperature": T, "top_k": zk, "top_p": one},
        keys,
        jnp.broadcast_to(jnp.asarray(q, jnp.float32), (N, L - 1, V)),
    )
    return np.asarray(tok), np.asarray(acc), np.asarray(path), toks


TREE = [-1, 0, 0, 0, 1, 1, 4]  # root: three children; node 1: two; node 4: one


@pytest.mark.parametrize("draft", ["random", "near"])
def test_multi_step_speculative_sampling_keeps_the_target_distribution(draft):
    """SpecInfer's rule over a tree whose siblings are i.i.d. draws of the draft at their
    parent: the first token has the target's distribution at the root, and the token after
    node c (when the path reaches c) the target's distribution at c."""
    V, N = 6, 20000
    L = len(TREE)
    rng = np.random.default_rng(8)
    p_logits = rng.normal(size=(L, V)) * 1.5
    p = _p(p_logits, 1.0, 0)
    q_at = {u: rng.dirichlet(np.ones(V)) for u in range(L)}  # the draft at each node
    if draft == "near":
        q_at = {u: 0.8 * p[u] + 0.2 * q_at[u] for u in range(L)}
    q_of_node = {c: q_at[TREE[c]] for c in range(1, L)}
    tok, acc, path, toks = _verify_tree(p_logits, TREE, q_of_node, 1.0, N)
    ok, pv = chi_square_ok(np.bincount(tok[:, 0], minlength=V), p[0])
    assert ok, pv
    for c in (1, 4):  # nodes with children: the next token's distribution is p at c
        depth = 1 if c == 1 else 2
        at_c = (acc >= depth) & (path[:, depth] == c)
        assert at_c.sum() > 500
        ok, pv = chi_square_ok(np.bincount(tok[at_c, depth], minlength=V), p[c])
        assert ok, (c, pv)
    for i in range(200):  # accepted tokens are the tokens of the path's nodes
        assert list(tok[i, : acc[i]]) == [toks[i, path[i, d + 1]] for d in range(acc[i])]
        assert all(TREE[path[i, d + 1]] == path[i, d] for d in range(acc[i]))


def test_tree_greedy_rows_follow_the_argmax():
    V, N = 5, 300
    L = len(TREE)
    rng = np.random.default_rng(1)
    p_logits = rng.normal(size=(L, V))
    q_of_node = {c: np.full(V, 1 / V) for c in range(1, L)}
    tok, acc, path, toks = _verify_tree(p_logits, TREE, q_of_node, 0.0, N)
    g = p_logits.argmax(-1)
    for i in range(N):
        u, want, nodes = 0, [], []
        while True:
            kids = [c for c in range(1, L) if TREE[c] == u and toks[i, c] == g[u]]
            if not kids:
                want.append(g[u])
                break
            u = kids[0]
            want.append(toks[i, u])
            nodes.append(u)
        assert acc[i] == len(nodes) and list(tok[i, : acc[i] + 1]) == want
        assert list(path[i, 1 : acc[i] + 1]) == nodes
