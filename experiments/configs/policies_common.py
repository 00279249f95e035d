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
    c.serve.policy_args = {}
    c.workload.update(online=True)
    c.workload.clients = []
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
