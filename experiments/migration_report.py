"""Plots and markdown tables of experiments/migration.py's results."""

from __future__ import annotations

import pathlib

import numpy as np

LATENCIES = ("ttft", "tpot", "e2e")


def _cdfs(axes, curves: dict[str, list[dict]]) -> None:
    """TTFT, TPOT and E2E CDFs (ms, log x) on three axes, a line per labelled request list
    (a one-token request, TPOT 0, is left out of the TPOT curve)."""
    for ax, key in zip(axes, LATENCIES, strict=True):
        for (label, ms), style in zip(curves.items(), ("-", "-", "--", "--"), strict=False):
            v = np.sort([1e3 * m[key] for m in ms if m.get(key, 0) > 0])
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), style, label=label)
        ax.set_xscale("log")
        ax.set_xlabel(f"{key.upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)


def _save(fig, out_png: pathlib.Path) -> None:
    from mlx_sched.plotting import plt

    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_latency(points: list[dict], out_png: pathlib.Path) -> None:
    """Per rate (a row each): TTFT, TPOT and E2E CDFs with migration off and on."""
    from mlx_sched.plotting import plt

    fig, axes = plt.subplots(len(points), 3, figsize=(12, 3.2 * len(points)), squeeze=False)
    for row, point in zip(axes, points, strict=True):
        curves = {
            f"migration {'on' if on else 'off'} ({sum(m['preemptions'] for m in ms)} "
            "preemptions)": ms
            for on, ms in sorted(point["requests"].items())
        }
        _cdfs(row, curves)
        row[0].set_title(f"{point['rate']:g} req/s", fontsize=9, loc="left")
    fig.suptitle("Llumnix dispatch, 4 instances, bursty heavy-tailed traces", fontsize=10)
    _save(fig, out_png)


def plot_priority(pooled: dict[str, list[dict]], out_png: pathlib.Path) -> None:
    from mlx_sched.plotting import plt

    curves = {}
    for cls, high in (("high", True), ("normal", False)):
        for arm, ms in pooled.items():
            curves[f"{cls}, {arm.replace('_', ' ')}"] = [
                m for m in ms if (m["priority"] > 0) == high
            ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    _cdfs(axes, curves)
    fig.suptitle("Llumnix with and without headroom for high-priority requests", fontsize=10)
    _save(fig, out_png)


def plot_downtime(rows: list[dict], out_png: pathlib.Path) -> None:
    from mlx_sched.plotting import plt

    L = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    dt = np.array([r["downtime_ms"] for r in rows])
    err = [dt - [r["downtime_min_ms"] for r in rows], [r["downtime_max_ms"] for r in rows] - dt]
    ax.errorbar(L, dt, yerr=err, marker="o", capsize=3, label="live migration: downtime")
    ax.plot(L, [r["copy_ms"] for r in rows], "s:", label="live migration: all stages' copies")
    ax.plot(L, [r["stop_and_copy_ms"] for r in rows], "^-", label="stop-and-copy: stopped")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms")
    ax.set_title("migration downtime vs context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out_png)


def _latency_cells(s: dict) -> list[str]:
    return [f"{1e3 * s[k][p]:.0f}" for k in LATENCIES for p in ("p50", "p99")]


LATENCY_HEAD = "TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | E2E p50 | E2E p99 (ms)"


def tables(results: dict) -> str:
    """The results as markdown tables."""
    md = []
    if "load_balance" in results:
        head = f"| rate (req/s) | migration | {LATENCY_HEAD} | preemptions | migrations |"
        md += [head, "|" + "---|" * 10]
        for point in results["load_balance"]["points"]:
            for arm, on in (("off", False), ("on", True)):
                s = point["pooled"][arm]
                moved = sum(r["migrations"] for r in point["runs"] if r["migration"] == on)
                cells = " | ".join(_latency_cells(s))
                md.append(f"| {point['rate']:g} | {arm} | {cells} | {s['preemptions']} | {moved} |")
        md += ["", "Per trace (seed), migration on vs off:", ""]
        md += _paired_table(
            [(f"{p['rate']:g} req/s", p["paired"]) for p in results["load_balance"]["points"]]
        )
    if "load_balance_sim" in results:
        head = f"| rate (req/s) | migration | {LATENCY_HEAD} | preemptions | migrations |"
        md += ["Simulated (instances side by side):", "", head, "|" + "---|" * 10]
        rates = results["load_balance_sim"]["rates"]
        for rate, arms in rates.items():
            for arm in ("off", "on"):
                s = arms[arm]["pooled"]
                moved = sum(r["migrations"] for r in arms[arm]["per_seed"].values())
                cells = " | ".join(_latency_cells(s))
                md.append(f"| {float(rate):g} | {arm} | {cells} | {s['preemptions']} | {moved} |")
        md += ["", "Per trace (seed), migration on vs off, simulated:", ""]
        md += _paired_table([(f"{float(r):g} req/s", a["paired"]) for r, a in rates.items()])
        md.append("")
    if "downtime" in results:
        md += [
            "| context (tokens) | KV (MiB) | stages | copies (ms) | downtime (ms) "
            "| stop-and-copy (ms) |",
            "|" + "---|" * 6,
        ]
        for r in results["downtime"]["by_length"]:
            md.append(
                f"| {r['length']} | {r['stop_and_copy_mib']:.2f} | {r['stages']:.1f} "
                f"| {r['copy_ms']:.2f} | {r['downtime_ms']:.2f} ({r['downtime_min_ms']:.2f}-"
                f"{r['downtime_max_ms']:.2f}) | {r['stop_and_copy_ms']:.2f} |"
            )
        md.append("")
    if "priority" in results:
        md += [f"| arm | class | {LATENCY_HEAD} | preemptions |", "|" + "---|" * 9]
        for arm, classes in results["priority"]["pooled"].items():
            for cls, s in classes.items():
                md.append(
                    f"| {arm} | {cls} | "
                    + " | ".join(_latency_cells(s))
                    + f" | {s['preemptions']} |"
                )
        md.append("")
        md += ["Per trace (seed), high-priority requests, headroom vs none:", ""]
        md += _paired_table([("high", results["priority"]["paired_high"])])
    return "\n".join(md)


def _paired_table(points: list[tuple[str, dict]]) -> list[str]:
    keys = list(points[0][1])  # migration.PAIRED's figures
    md = ["| point | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for label, p in points:
        ratio = lambda r: "n/a" if np.isnan(r) else f"{r:.2f}x"
        cells = [
            f"{ratio(p[k]['median_ratio'])} ({p[k]['lower']} lower, {p[k]['higher']} higher "
            f"of {p[k]['seeds']})"
            for k in keys
        ]
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    return md + [""]
