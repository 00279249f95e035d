"""FastServe: job completion time of skip-join MLFQ vs FCFS under heavy-tailed output lengths,
and starvation with promotion off.

With few slots, FCFS makes short jobs wait behind long ones (head-of-line blocking);
MLFQ runs newcomers first and demotes long jobs, cutting mean and tail JCT.

  python -m experiments.sweep --config=experiments/configs/mlfq.py --workdir=runs/mlfq
"""

from experiments.configs import policies_common as pc


def get_config(arg: str = "default"):
    c = pc.base(arg)
    c.serve.update(
        max_seqs=4,
        decode_buckets=(4,),
        token_budget=256,
        prefill_buckets=(64, 256),
        num_pages=512,
        slice_len=1,
        preemption="swap",
    )
    c.workload.clients = [
        dict(name="c", rate=3.0, num_requests=150, preset="sharegpt", length_scale=0.5)
    ]
    if arg == "runlocal":
        c.serve.update(token_budget=64, prefill_buckets=(64,), num_pages=256)
        pc.scale_clients(c, 0.1)
        c.workload.clients = [{**c.workload.clients[0], "length_scale": 0.05}]
    return c


def get_sweep(arg: str = "default"):
    del arg
    return [
        {"name": "fcfs", "serve.policy": "fcfs"},
        {"name": "mlfq", "serve.policy": "mlfq", "serve.policy_args": {"q0": 0.01}},
        {
            "name": "mlfq_no_promotion",
            "serve.policy": "mlfq",
            "serve.policy_args": {"q0": 0.01, "promote_every": 0},
        },
    ]


def summarize(rows, workdir):
    for r in rows:
        r["jct_mean"], r["jct_p99"] = r["e2e_mean"], r["e2e_p99"]
    md = "# MLFQ (FastServe) vs FCFS: job completion time\n\n" + pc.table(
        rows,
        [
            ("point", "name"),
            ("JCT mean (s)", "jct_mean"),
            ("JCT p50 (s)", "e2e_p50"),
            ("JCT p99 (s)", "jct_p99"),
            ("TTFT p50 (s)", "ttft_p50"),
            ("normalized latency mean (s/token)", "normalized_latency_mean"),
            ("preemptions", "preemptions"),
            ("out tok/s", "output_tok_s"),
        ],
    )
    by = {r["name"]: r for r in rows}
    if "fcfs" in by and "mlfq" in by:
        f, m = by["fcfs"], by["mlfq"]
        md += (
            f"\nPaper: 5.1x lower mean and 6.4x lower tail JCT than Orca (FCFS). Here MLFQ's "
            f"mean JCT is {f['jct_mean'] / m['jct_mean']:.2f}x and its P99 "
            f"{f['jct_p99'] / m['jct_p99']:.2f}x lower than FCFS (>1 means better).\n"
        )
    if "mlfq_no_promotion" in by and "mlfq" in by:
        n, m = by["mlfq_no_promotion"], by["mlfq"]
        md += (
            f"Starvation: without promotion the P99 JCT is {n['jct_p99']:.1f}s vs "
            f"{m['jct_p99']:.1f}s with it.\n"
        )
    return md
