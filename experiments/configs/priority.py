"""Priority classes under load: TTFT of the high class vs the low class, FCFS vs priority.

20% of requests are high priority; the engine is overloaded so queues form.

  python -m experiments.sweep --config=experiments/configs/priority.py --workdir=runs/priority
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
        slice_len=4,
    )
    c.workload.clients = [
        dict(name="low", rate=4.0, num_requests=120, preset="sharegpt", length_scale=0.3),
        dict(
            name="high", rate=1.0, num_requests=30, preset="sharegpt", length_scale=0.3, priority=1
        ),
    ]
    if arg == "default":
        pc.scale_rates(c, 5.0)  # overload the real engine (~1,500 tok/s at 4 slots here)
    if arg == "runlocal":
        c.serve.update(token_budget=64, prefill_buckets=(64,), num_pages=256)
        pc.scale_clients(c, 0.15)
        c.workload.clients = [{**cl, "length_scale": 0.05} for cl in c.workload.clients]
    return c


def get_sweep(arg: str = "default"):
    del arg
    return [
        {"name": "fcfs", "serve.policy": "fcfs"},
        {"name": "priority", "serve.policy": "priority", "serve.policy_args": {"mode": "class"}},
        {
            "name": "priority_no_preempt",
            "serve.policy": "priority",
            "serve.policy_args": {"mode": "class", "preempt": False},
        },
    ]


def summarize(rows, workdir):
    curves = {}
    for r in rows:
        ms = [m for m in pc.request_metrics(workdir, r["name"]) if "ttft" in m]
        for prio, cls in ((1, "high"), (0, "low")):
            curves[f"{r['name']}: {cls}"] = [m["ttft"] for m in ms if m["priority"] == prio]
    pc.cdf_plot(workdir, curves, "TTFT (s)", "TTFT by priority class", "priority.png")
    md = "# Priority classes: TTFT of high vs low\n\n" + pc.table(
        rows,
        [
            ("point", "name"),
            ("high TTFT p50 (s)", "ttft_p50_prio1"),
            ("high TTFT p99 (s)", "ttft_p99_prio1"),
            ("low TTFT p50 (s)", "ttft_p50_prio0"),
            ("low TTFT p99 (s)", "ttft_p99_prio0"),
            ("preemptions", "preemptions"),
            ("out tok/s", "output_tok_s"),
        ],
    )
    by = {r["name"]: r for r in rows}
    if "fcfs" in by and "priority" in by:
        f, p = by["fcfs"], by["priority"]
        md += (
            f"\nExpected: the high class's TTFT drops well below the low class's, at a small "
            f"cost to the low class. Here high-class TTFT p50 goes from "
            f"{f['ttft_p50_prio1']:.2f}s (FCFS) to {p['ttft_p50_prio1']:.2f}s; the low class "
            f"from {f['ttft_p50_prio0']:.2f}s to {p['ttft_p50_prio0']:.2f}s.\n"
        )
    md += "Plot: priority.png (TTFT CDFs per class)\n"
    return md
