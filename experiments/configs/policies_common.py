"""Shared base for the scheduling-policy experiments (fairness, chunked_prefill, mlfq,
slice_level, priority): a served model, an engine and a workload, plus the summary helpers."""

from __future__ import annotations

import json
import pathlib

import ml_collections

from experiments.configs import serve


def base(arg: str) -> ml_collections.ConfigDict:
    """`default` runs the real engine on the 3.2M-parameter model; `sim` the simulator;
    `runlocal` a tiny model and a short trace (tests)."""
    if arg not in ("default", "sim", "runlocal"):
        raise ValueError(f"unknown variant '{arg}'; choose default, sim or runlocal")
    c = serve.get_config("runlocal" if arg == "runlocal" else "default")
    c.device = "sim" if arg == "sim" else "real"
    c.serve.update(policy="fcfs", slice_len=1)
    c.workload.update(online=True)
    c.workload.clients = []
    # > 0: the clients' rates are scaled (ratios and trace duration kept) so that together they
    # offer this multiple of the engine's capacity as measured on this machine before the run
    c.workload.offered_load = 0.0
    c.slo = dict(ttft=1.0, tpot=0.05)
    # the simulated device: step times of a mid-size model on one accelerator
    c.sim_cost = dict(
        base_mixed=0.02,
        base_decode=0.015,
        per_prefill_token=1e-4,
        per_prefill_pair=1e-8,
        per_decode_token=2e-4,
        per_decode_ctx=2e-7,
    )
    return c


def scale_clients(c, factor: float) -> None:
    """Shrink request counts (runlocal)."""
    c.workload.clients = [
        {**cl, "num_requests": max(2, int(cl["num_requests"] * factor))}
        for cl in c.workload.clients
    ]


def scale_rates(c, factor: float) -> None:
    """Multiply every client's arrival rate and request count by `factor` (same duration):
    the real engine on this CPU serves the small model faster than the simulated device,
    so its variant needs more load to reach the same overload."""
    c.workload.clients = [
        {**cl, "rate": cl["rate"] * factor, "num_requests": int(cl["num_requests"] * factor)}
        for cl in c.workload.clients
    ]


def load_note(row: dict) -> tuple[bool, str]:
    """Whether a point's engine was overloaded, judged from what the run measured (offered vs
    served requests per second), and a sentence saying so."""
    offered, served, cap = (
        row.get("offered_req_s"),
        row.get("served_req_s"),
        row.get("capacity_req_s"),
    )
    if not offered or not served:
        return False, f"{row['name']} did not record its offered and served load"
    text = f"{row['name']} was offered {offered:.2f} req/s and served {served:.2f} req/s"
    if cap:
        text += f" (capacity measured before the run: {cap:.2f} req/s)"
    return offered >= OVERLOADED * served, text


OVERLOADED = 1.2  # offered / served at or above which requests queued faster than they finished


def row_value(row: dict, key: str, fmt: str = "{:.3g}") -> str:
    v = row.get(key)
    return "" if v is None else fmt.format(v) if isinstance(v, float) else str(v)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(name for name, _ in columns) + " |"
    sep = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(row_value(r, k) for _, k in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def load_series(workdir: pathlib.Path, name: str, file: str = "service.json") -> dict | None:
    path = pathlib.Path(workdir) / name / file
    return json.loads(path.read_text()) if path.exists() else None


def request_metrics(workdir: pathlib.Path, name: str) -> list[dict]:
    path = pathlib.Path(workdir) / name / "serving_requests.json"
    return json.loads(path.read_text()) if path.exists() else []


def cdf_plot(workdir, curves: dict[str, list[float]], xlabel: str, title: str, out: str) -> None:
    """One empirical CDF per labelled list of values (log x axis), saved as workdir/out."""
    import numpy as np

    from mlx_sched.plotting import plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, values in curves.items():
        if values:
            v = np.sort(np.maximum(np.asarray(values, float), 1e-4))
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(pathlib.Path(workdir) / out, dpi=110)
    plt.close(fig)
