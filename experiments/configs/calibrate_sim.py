"""Simulator calibration: fit the simulator's step time to the real engine, then measure its
error on traces it was not fitted on (experiments/calibrate_sim.py).

Variants:
  default   a dense model and an MoE model (d_model 128, 2 layers: serve.py's decode_small
            sizes; the MoE one has 4 top-1 experts in its second layer), fitted on a
            ShareGPT-like Poisson trace and a burst, checked on four other traces
            (10-60 req/s: short; heavy-tailed and bursty; prefill-heavy; decode-heavy)
  runlocal  the same with tiny models and short traces (tests)

  python -m experiments.calibrate_sim --workdir=runs/calibrate_sim
  python -m experiments.calibrate_sim --config=experiments/configs/calibrate_sim.py:runlocal \
      --workdir=/tmp/cal
  python -m experiments.calibrate_sim --workdir=runs/cal8 --config.repeats=8  # tighter

A trace is `dict(name, preset, rate, num_requests, length_scale, cv, seed)` for
`lab.workload.synthetic_trace` (rate 0: every request at t=0; cv != 1: Gamma arrivals).
"""

import ml_collections

from experiments.configs import lm


def trace(name, preset, rate, num_requests, length_scale=1.0, cv=1.0, seed=0) -> dict:
    return dict(
        name=name,
        preset=preset,
        rate=float(rate),
        num_requests=num_requests,
        length_scale=float(length_scale),
        cv=float(cv),
        seed=seed,
    )


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in ("default", "runlocal"):
        raise ValueError(f"unknown variant '{arg}' of calibrate_sim.py; choose default or runlocal")
    dense = lm.get_config("default").model.to_dict()
    dense.update(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=512)
    moe = dict(dense, moe=dict(num_experts=4, top_k=1, every=2, offset=1))
    c = ml_collections.ConfigDict()
    c.kind = "calibrate_sim"
    c.models = dict(dense=dense, moe=moe)
    c.serve = dict(
        page_size=16,
        num_pages=1024,
        max_seqs=32,
        token_budget=128,
        slice_len=4,
        policy="fcfs",
        history=-1,  # every step record: the fit's data
    )
    # the fit's traces: steady Poisson load and a burst (all at t=0) that fills the batch
    c.fit_traces = [
        trace("fit_sharegpt_r40", "sharegpt", 40, 240, 0.25, seed=1),
        trace("fit_burst", "sharegpt", 0, 96, 0.25, seed=2),
    ]
    # traces the fit never saw: other rates, length distributions and burstiness
    c.eval_traces = [
        trace("alpaca_r60", "alpaca", 60, 240, seed=11),
        trace("heavy_tail_r30_cv2", "heavy_tail", 30, 150, cv=2.0, seed=12),
        trace("azure_conv_r20", "azure_conv", 20, 100, 0.25, seed=13),
        trace("decode_heavy_r10", "decode_heavy", 10, 50, seed=14),
    ]
    # noise: draw the machine's speed and the steps' spread; seeds: simulations averaged
    c.sim = dict(noise=True, min_count=3, seed=0, seeds=5)
    c.repeats = 3  # real runs per trace (alternating with the fit's), averaged
    c.save_runs = False  # also write every real run's step records (runs_<model>.pkl)
    c.runs_from = ""  # a workdir saved with save_runs: refit and simulate its runs, no measuring
    # a run during which other processes used more CPU cores than this is measured again
    # (up to `retries` times; the least disturbed one is kept)
    c.max_other_cores = 0.25
    c.retries = 2
    if arg == "runlocal":
        c.models.dense.update(d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=128)
        c.models.moe.update(d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=128)
        c.serve.update(num_pages=128, max_seqs=8, token_budget=32, slice_len=4)
        c.repeats = 2
        c.sim.seeds = 2
        c.fit_traces = [
            trace("fit_sharegpt_r40", "sharegpt", 40, 24, 0.1, seed=1),
            trace("fit_burst", "sharegpt", 0, 12, 0.1, seed=2),
        ]
        c.eval_traces = [trace("alpaca_r100", "alpaca", 100, 20, 0.5, seed=11)]
    return c
