"""VTC fairness: two clients sending 1 : 2 (the paper's 1.5 and 3 req/s), 256 in / 256 out
tokens, on an engine that serves fewer.

FCFS serves in arrival order, so the client sending twice as much gets about twice
the service and the gap keeps growing; VTC equalises (weighted) service, so the gap
between backlogged clients stays bounded. Both effects need both clients backlogged,
i.e. each sending more than half of what the engine serves. How much that is depends on
the machine, so the real-engine variants measure the engine's capacity first (two slots,
this request mix, `capacity.json` in the sweep folder) and offer `workload.offered_load`
= 2x it: the lighter client alone then offers 2/3 of capacity, above its fair half. `sim`
keeps the paper's rates on the simulated device. The summary's verdict says whether
the run reached that regime (both clients backlogged for most of the FCFS run) before it
says anything about the paper's claim.

  python -m experiments.sweep --config=experiments/configs/fairness.py --workdir=runs/fairness
"""

from experiments.configs import policies_common as pc

BACKLOGGED = 0.5  # share of the FCFS run with both clients queued: the paper's regime
GROWS = 4.0  # FCFS's gap, in requests' cost, that counts as growing rather than noise
BOUNDED = 2.0  # VTC's gap, in requests' cost, within its bound (2 x the largest request)


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
    if arg != "sim":
        c.workload.offered_load = 2.0
    if arg == "runlocal":
        c.workload.clients = [
            dict(name="c1", rate=1.5, num_requests=2, input_len=24, output_len=24),
            dict(name="c2", rate=3.0, num_requests=4, input_len=24, output_len=24),
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
        md += "\n" + verdict(by["fcfs"], by["vtc"]) + "\n"
    return md + "Plot: fairness.png\n"


def verdict(fcfs: dict, vtc: dict) -> str:
    """The paper's claim against this run's measurements, saying first whether the run reached
    the regime the claim is about."""
    f, v = fcfs["max_service_diff"], vtc["max_service_diff"]
    cost = fcfs.get("max_request_cost") or 768
    share = fcfs.get("backlogged_share") or 0.0
    _, load = pc.load_note(fcfs)
    text = (
        f"Paper: while both clients are backlogged, FCFS's service difference grows without "
        f"bound and VTC's stays within about two requests' cost. Here {load}; both clients "
        f"had requests queued for {share:.0%} of the FCFS run, and the largest gap was "
        f"{f:,.0f} tokens ({f / cost:.1f} requests of cost {cost:,.0f}) under FCFS and "
        f"{v:,.0f} ({v / cost:.1f}) under VTC. "
    )
    if share < BACKLOGGED:
        return text + (
            f"The run was NOT overloaded (both clients backlogged under {BACKLOGGED:.0%} of the "
            "time): the regime the paper needs was not reached, so this run neither reproduces "
            "nor refutes it. Raise workload.offered_load (or lower serve.max_seqs) and re-run."
        )
    if f >= GROWS * cost and v <= BOUNDED * cost:
        return text + (
            f"The effect reproduces: FCFS's gap grew to {f / max(v, 1):.0f}x VTC's, and VTC's "
            f"stayed within {BOUNDED:g} requests' cost."
        )
    why = []
    if f < GROWS * cost:
        why.append(
            f"FCFS's gap stayed under {GROWS:g} requests' cost although both were backlogged"
        )
    if v > BOUNDED * cost:
        why.append(f"VTC's gap exceeded {BOUNDED:g} requests' cost")
    return text + "The effect does NOT reproduce: " + "; ".join(why) + "."
