"""Speculative decoding experiments: trained target and drafts (cached), code prompts, and
one measurement per sweep point (`experiments/configs/speculative.py`).

Models are trained once with the existing trainer on the built-in corpus and cached under
`config.models_dir` (a sweep's points share them); a present final checkpoint is reused.
`draft_distilled` has the medium draft's shape but learns from the target instead of the
corpus (sequence-level distillation): its text is the target's greedy continuations of
prompts from the corpus's training split, written once under `distill_data/`.
"""

from __future__ import annotations

import logging
import pathlib
import time

import numpy as np

# name -> (layers, d_model, heads, kv heads, d_ff, train steps); runlocal shrinks them
MODELS = {
    "target": (6, 256, 8, 4, 768, 2000),
    "draft_small": (1, 64, 4, 2, 192, 500),
    "draft_medium": (2, 128, 4, 2, 384, 500),
    "draft_distilled": (2, 128, 4, 2, 384, 500),
}
TINY = {
    "target": (2, 64, 4, 2, 128, 30),
    "draft_small": (1, 32, 2, 1, 64, 20),
    "draft_medium": (1, 48, 2, 1, 96, 20),
    "draft_distilled": (1, 48, 2, 1, 96, 20),
}
# distillation text: documents, prompt bytes, greedy continuation tokens (full, tiny)
DISTILL = {False: (4096, 64, 192), True: (128, 32, 32)}


def model_config(name: str, tiny: bool = False):
    """The lm.py training config of one of the experiment's models."""
    from experiments.configs import lm

    layers, d, heads, kv, ff, steps = (TINY if tiny else MODELS)[name]
    c = lm.get_config("default")
    c.model.update(n_layers=layers, d_model=d, n_heads=heads, n_kv_heads=kv, d_ff=ff)
    c.train.update(steps=steps, eval_every=steps, ckpt_every=steps)
    if tiny:
        # a batch of 8: it splits over the 8 devices a test forces as well as over 1
        c.train.update(batch_size=8, seq_len=64, log_every=10, eval_batches=1)
    return c


def ensure_model(models_dir: pathlib.Path, name: str, tiny: bool = False) -> pathlib.Path:
    """The run folder of a trained model, training it first when its final checkpoint is
    missing (progress in the log; a few minutes on 2 cores for the drafts, ~25 for the
    target)."""
    from mlx_sched.train import loop

    run = pathlib.Path(models_dir) / name
    steps = (TINY if tiny else MODELS)[name][-1]
    if (run / "checkpoints" / str(steps)).exists():
        return run
    config = model_config(name, tiny)
    if name == "draft_distilled":
        # a tenth of the documents held out: the eval loss is on text of the target's
        config.data.update(path=str(distill_data(models_dir, tiny)), heldout_fraction=0.1)
    logging.info("training %s (%d steps) into %s", name, steps, run)
    t0 = time.perf_counter()
    loop.train_from_config(config, run)
    logging.info("trained %s in %.0f s", name, time.perf_counter() - t0)
    return run


def line_slices(stream, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n slices of `length` tokens of a corpus stream, each starting at a line."""
    stream = np.asarray(stream)
    rng = np.random.default_rng(seed)
    newlines = np.flatnonzero(stream[: len(stream) - length - 1] == ord("\n"))
    starts = rng.choice(newlines, size=n, replace=False) + 1
    return [list(map(int, stream[s : s + length])) for s in starts]


def code_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` byte tokens from held-out stdlib sources, each starting at a line."""
    from mlx_sched.train.data import load_corpus

    return line_slices(load_corpus().heldout, n, length, seed)


def distill_data(models_dir: pathlib.Path, tiny: bool = False) -> pathlib.Path:
    """The folder of the distilled draft's text (made once, after the target): per document,
    a prompt from the corpus's training split (never the held-out sources the benchmarks
    prompt with) and the target's greedy continuation, up to a stop token. Continuations
    whose bytes are not UTF-8 text are left out (the corpus reader takes text only)."""
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.serve.engine import Engine
    from mlx_sched.serve.request import SamplingParams
    from mlx_sched.train.data import load_corpus

    out = pathlib.Path(models_dir) / "distill_data"
    docs_dir = out / "docs"
    if (out / "done").exists():
        return docs_dir
    docs, prompt_len, out_len = DISTILL[tiny]
    target = load(ensure_model(models_dir, "target", tiny), "float32")
    prompts = line_slices(load_corpus().train, docs, prompt_len, seed=1)
    engine = Engine(target, ServeConfig(num_pages=4096, max_seqs=64, token_budget=512,
                                        max_context=prompt_len + out_len))  # fmt: skip
    docs_dir.mkdir(parents=True, exist_ok=True)
    sp = SamplingParams(max_tokens=out_len)
    kept, t0 = 0, time.perf_counter()
    for i in range(0, docs, 256):
        for j, res in enumerate(engine.generate(prompts[i : i + 256], sp)):
            text = bytes(t for t in prompts[i + j] + res.outputs[0] if t < 256)
            try:
                text.decode("utf-8")
            except UnicodeDecodeError:
                continue
            (docs_dir / f"{i + j:05d}.txt").write_bytes(text)
            kept += 1
        logging.info("distillation text: %d / %d documents (%.0f s)", min(i + 256, docs),
                     docs, time.perf_counter() - t0)  # fmt: skip
    (out / "done").write_text(f"{kept} documents\n")
    return docs_dir


def load(run: pathlib.Path, dtype: str):
    from experiments.serving import load_weights

    return load_weights(str(run), dtype)


def serve_settings(point: dict, max_seqs: int) -> dict:
    """ServeConfig fields for a point: decode slots in powers of two from 1, verify widths
    for the point's drafts (adaptive: 1, 2, 3, 5, 9 up to gamma + 1)."""
    gamma, width = point.get("gamma", 0), point.get("tree_width", 1)
    buckets, b = [], 1
    while b < max_seqs:
        buckets.append(b)
        b *= 2
    buckets.append(max_seqs)
    serve = dict(
        page_size=16,
        num_pages=2048,
        max_seqs=max_seqs,
        decode_buckets=tuple(buckets),
        # mixed steps by 4x and two prefill sizes: with AdaSpec's five verify widths, a bucket
        # per power of two made ~150 programs, past what LLVM could map in one process here
        mixed_decode_buckets=tuple(sorted({*buckets[::2], max_seqs})),
        token_budget=512,
        prefill_buckets=(64, 512),
        max_prefill_rows=4,
        max_context=1024,
        history=-1,  # every step record: a run's statistics slice them
    )
    drafter = point.get("drafter", "off")
    if drafter == "off" or not gamma:
        return serve
    kind = "prompt_lookup" if drafter == "lookup" else "draft_model"
    spec = {"kind": kind, "gamma": gamma, "tree_width": width}
    if point.get("adaptive"):
        spec["adaptive"] = True
        serve["decode_widths"] = tuple(w for w in (1, 2, 3, 5, 9) if w <= gamma + 1)
    else:
        serve["decode_widths"] = (1, gamma * width + 1)
    serve["speculative"] = spec
    return serve


def offline_groups(engine, groups, max_tokens: int, temperature: float, runs: int) -> dict:
    """Each group's prompts at once, the groups one after another; the wall time of all groups,
    best of `runs` after one warm-up pass."""
    from mlx_sched.serve.request import SamplingParams

    def sps(group):
        return [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i,
                               ignore_eos=True) for i in range(len(group))]  # fmt: skip

    for g in groups[:1]:
        engine.generate(g, sps(g))
    best, recs = None, None
    for _ in range(runs):
        n0 = len(engine.step_records)
        t0 = time.perf_counter()
        for g in groups:
            engine.generate(g, sps(g))
        wall = time.perf_counter() - t0
        if best is None or wall < best:
            best, recs = wall, engine.step_records[n0:]
    n = sum(len(g) for g in groups)
    out = {"wall_s": best, "output_tok_s": n * max_tokens / best}
    out.update(step_stats(recs))
    return out


def online(engine, prompts, max_tokens, temperature, rate, seed, ttft_slo, tpot_slo) -> dict:
    """Requests arriving as a Poisson stream at `rate` per second; latency, SLO attainment and
    goodput (output tokens/s of the requests that met both SLOs)."""
    from mlx_sched.lab import slo
    from mlx_sched.serve.request import SamplingParams

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=len(prompts))
    gaps[0] = 0.0
    arrive = np.cumsum(gaps)
    n0 = len(engine.step_records)
    t0 = time.perf_counter()
    i, ids = 0, []
    while i < len(prompts) or engine.has_work():
        now = time.perf_counter() - t0
        while i < len(prompts) and arrive[i] <= now:
            sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i,
                                ignore_eos=True)  # fmt: skip
            ids.append(engine.add_request(prompts[i], sp, arrival=t0 + arrive[i]))
            i += 1
        if engine.has_work():
            engine.step()
        elif i < len(prompts):
            time.sleep(max(0.0, min(arrive[i] - now, 0.01)))
    wall = time.perf_counter() - t0
    mine = set(ids)
    rms = [m for m in engine.request_metrics() if m["id"] in mine]
    met = [m for m in rms if slo.meets_slo(m, ttft_slo, tpot_slo)]
    out = {
        "wall_s": wall,
        "output_tok_s": sum(m["output_len"] for m in rms) / wall,
        "goodput_tok_s": sum(m["output_len"] for m in met) / wall,
        "slo_attainment": len(met) / max(1, len(rms)),
        "ttft_p50": float(np.percentile([m["ttft"] for m in rms], 50)),
        "ttft_p90": float(np.percentile([m["ttft"] for m in rms], 90)),
        "tpot_p50": float(np.percentile([m["tpot"] for m in rms if "tpot" in m], 50)),
        "tpot_p90": float(np.percentile([m["tpot"] for m in rms if "tpot" in m], 90)),
    }
    out.update(step_stats(engine.step_records[n0:]))
    return out


def step_stats(recs) -> dict:
    """Acceptance, tokens per verify, and where the time went, over a run's steps."""
    verify = [r for r in recs if r.spec_proposed]
    decode = [r for r in recs if r.num_decode and not r.num_prefill_tokens]
    proposed = sum(r.spec_proposed for r in verify)
    accepted = sum(r.spec_accepted for r in verify)
    return {
        "proposed": proposed,
        "accepted": accepted,
        "acceptance": accepted / proposed if proposed else None,
        "tokens_per_verify": (
            sum(r.new_tokens for r in verify) / sum(r.num_decode for r in verify)
            if verify
            else None
        ),
        "verify_share": len(verify) / max(1, len(decode)),
        "draft_s": sum(r.draft_s for r in recs),
        "verify_s": sum(r.device_s for r in verify),
        "device_s": sum(r.device_s for r in recs),
        "host_s": sum(r.host_s - r.draft_s for r in recs),
        # one decode iteration per sequence without speculation (batch-1 cost of the target)
        "decode_iter_s": (
            float(np.median([r.device_s / max(1, r.iters) for r in decode if r.kind == "decode"]))
            if any(r.kind == "decode" for r in decode)
            else None
        ),
    }


def off_tok_s(row: dict, ref: dict) -> float:
    """Speculation off's tok/s to compare a `bench_speculative` row with: from the row's own
    interleaved runs, or else the batch's off row in `ref`."""
    return row.get("off_tok_s") or ref[row["batch"]]["output_tok_s"]


def bench_verdicts(rows, ref) -> list[str]:
    """`bench_speculative`'s verdicts: the issue's goals, each checked against the rows of a
    run (`ref`: speculation off by batch). Here, with no flags, so that tests can import it."""
    out = []

    def off(r) -> float:
        return off_tok_s(r, ref)

    for name in sorted({r["drafter"] for r in rows} - {"off"}):
        mine = [r for r in rows if r["drafter"] == name]
        acc = [r["acceptance"] for r in mine if r["acceptance"] is not None]
        alpha = float(np.mean(acc)) if acc else float("nan")
        low = [r for r in mine if r["batch"] <= 4 and not r.get("adaptive")]
        for b in sorted({r["batch"] for r in low}):
            # by ratio: each row's off is its own interleaved runs, so tok/s alone can disagree
            best = max(
                (r for r in low if r["batch"] == b), key=lambda r: r["output_tok_s"] / off(r)
            )
            ratio = best["output_tok_s"] / off(best)
            out.append(
                f"{name}: batch {b}: best fixed mode {best['mode']} {ratio:.2f}x off "
                f"(mean acceptance {alpha:.2f}; goal >= 2x with acceptance >= 0.7)"
            )
        idle = [r for r in mine if r.get("idle")]
        if idle:
            ratios = ", ".join(
                f"batch {r['batch']} {r['output_tok_s'] / off(r):.2f}x" for r in idle
            )
            out.append(f"{name}: idle (speculation configured, never drafting) vs off: {ratios}")
        ada = [r for r in mine if r.get("adaptive") and not r.get("idle")]
        if ada:
            worst = min(r["output_tok_s"] / off(r) for r in ada)
            out.append(f"{name}: adaptive vs off, worst batch: {worst:.2f}x (goal >= 1.00x)")
            for r in ada:
                fixed = [x for x in mine if x["batch"] == r["batch"] and not x.get("adaptive")]
                best = max(fixed, key=lambda x: x["output_tok_s"]) if fixed else None
                vs = f"best fixed ({best['mode']}) {best['output_tok_s']:,.0f}, " if best else ""
                out.append(f"  batch {r['batch']}: adaptive {r['output_tok_s']:,.0f} tok/s, "
                           f"{vs}off {off(r):,.0f}")  # fmt: skip
    return out
