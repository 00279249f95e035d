"""VTC fairness: two clients at 1.5 and 3 req/s, 256 in / 256 out tokens, overloaded.

FCFS serves in arrival order, so the client sending twice as much gets about twice
the service and the gap keeps growing; VTC equalises (weighted) service, so the gap
between backlogged clients stays bounded. The engine is sized (max_seqs=2) so the
offered load exceeds what it can serve.

  python -m experiments.sweep --config=experiments/configs/fairness.py --workdir=runs/fairness
"""

from experiments.configs import policies_common as pc


def get_config(arg: str = "default"):
    c = pc.base(arg)
    c.serve.update(
        max_seqs=2,
        decode_buckets=(2,),
        token_budget=256,
        prefill_buckets=(256,),
        num_pages=80,
        page_size=16,
        slice_len=4,
    )
    c.workload.clients = [
        dict(name="c1", rate=1.5, num_requests=45, input_len=256, output_len=256),
        dict(name="c2", rate=3.0, num_requests=90, input_len=256, output_len=256),
    ]
    if arg == "runlocal":
        c.workload.clients = [
            dict(name="c1", rate=1.5, num_requests=4, input_len=24, output_len=24),
            dict(name="c2", rate=3.0, num_requests=8, input_len=24, output_len=24),
        ]
        c.serve.update(token_budget=64, prefill_buckets=(64,))
    return c


def get_sweep(arg: str = "default"):
    del arg
    return [
        {"name": "fcfs", "serve.policy": "fcfs"},
        {"name": "vtc", "serve.policy": "vtc"},
        {
            "name": "vtc_weighted_c1x2",
            "serve.policy": "vtc",
            "serve.policy_args": {"weights": {"c1": 2.0}},
        },
    ]


def summarize(rows, workdir):
    from mlx_sched.plotting import plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for r in rows:
        s = pc.load_series(workdir, r["name"])
        if s:
            t = [x - s["t"][0] for x in s["t"]]
            ax.plot(t, s["diff"], label=r["name"])
    ax.set_xlabel("time (s)")
    ax.set_ylabel("service difference (tokens, w_out = 2)")
    ax.set_title("service gap between backlogged clients")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{workdir}/fairness.png", dpi=110)
    plt.close(fig)
    for r in rows:
        b = r["backlogged_service"]
        r["served_c1"], r["served_c2"] = b.get("c1"), b.get("c2")
    md = "# Fairness: FCFS vs VTC\n\n" + pc.table(
        rows,
        [
            ("point", "name"),
            ("max service diff", "max_service_diff"),
            ("Jain while backlogged", "jain"),
            ("c1 service while backlogged", "served_c1"),
            ("c2 service while backlogged", "served_c2"),
            ("c1 TTFT p50 (s)", "ttft_p50_c1"),
            ("c2 TTFT p50 (s)", "ttft_p50_c2"),
            ("out tok/s", "output_tok_s"),
        ],
    )
    by = {r["name"]: r for r in rows}
    if "fcfs" in by and "vtc" in by:
        f, v = by["fcfs"]["max_service_diff"], by["vtc"]["max_service_diff"]
        verdict = "reproduces" if v < f / 2 else "does NOT reproduce"
        md += (
            f"\nPaper: FCFS's service difference grows without bound, VTC's stays bounded. "
            f"Here the largest gap is {f:.0f} tokens under FCFS and {v:.0f} under VTC "
            f"({f / max(v, 1):.1f}x smaller): the direction {verdict}. Plot: fairness.png\n"
        )
    return md
