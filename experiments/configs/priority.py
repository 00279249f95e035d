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
        md += "\n" + verdict(by["fcfs"], by["priority"]) + "\n"
    md += "Plot: priority.png (TTFT CDFs per class)\n"
    return md


def verdict(fcfs: dict, prio: dict) -> str:
    """The expected effect against this run's numbers, after whether FCFS was overloaded (with
    no queue, there is nothing for a priority class to skip)."""
    over, load = pc.load_note(fcfs)
    hi_f, lo_f = fcfs["ttft_p50_prio1"], fcfs["ttft_p50_prio0"]
    hi_p, lo_p = prio["ttft_p50_prio1"], prio["ttft_p50_prio0"]
    text = (
        f"Expected: the high class's TTFT drops well below the low class's, at a small cost to "
        f"the low class. Here {load}; high-class TTFT p50 goes from {hi_f:.2f}s (FCFS) to "
        f"{hi_p:.2f}s, the low class's from {lo_f:.2f}s to {lo_p:.2f}s. "
    )
    if not over:
        return text + (
            "FCFS was NOT overloaded (requests did not queue faster than they finished): the "
            "regime the comparison needs was not reached."
        )
    if hi_p < 0.5 * lo_p and hi_p < hi_f:
        return text + "As expected under overload: the high class overtakes the queue."
    return text + "NOT as expected: the high class's TTFT did not fall well below the low's."
