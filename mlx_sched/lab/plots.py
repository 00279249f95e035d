"""Standard serving plots: latency CDFs and a per-step timeline."""

from __future__ import annotations

import pathlib

import numpy as np

from mlx_sched.plotting import plt


def latency_cdfs(requests: list[dict], out_png: str | pathlib.Path) -> None:
    """CDFs of TTFT, TPOT and E2E latency (ms) over finished requests."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key in zip(axes, ("ttft", "tpot", "e2e"), strict=True):
        vals = np.sort([1e3 * r[key] for r in requests if key in r])
        if len(vals):
            ax.plot(vals, np.arange(1, len(vals) + 1) / len(vals))
            for p in (50, 90, 99):
                ax.axvline(np.percentile(vals, p), ls=":", lw=0.8, color="gray")
        ax.set_xlabel(f"{key.upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def timeline(steps, out_png: str | pathlib.Path) -> None:
    """Per step: running/waiting sequences, tokens computed, KV pages in use and live share."""
    if not steps:
        return
    t = np.array([s.t for s in steps]) - steps[0].t
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    axes[0].plot(t, [s.running for s in steps], label="running")
    axes[0].plot(t, [s.waiting for s in steps], label="waiting")
    axes[0].set_ylabel("sequences")
    axes[0].legend()
    axes[1].plot(t, [s.num_decode * s.iters for s in steps], ".", ms=2, label="decode tokens")
    axes[1].plot(t, [s.num_prefill_tokens for s in steps], ".", ms=2, label="prefill tokens")
    axes[1].set_ylabel("tokens / step")
    axes[1].legend()
    axes[2].plot(t, [s.pages_in_use for s in steps], label="pages in use")
    ax2 = axes[2].twinx()
    ax2.plot(t, [100 * s.kv_live_fraction for s in steps], color="C2", lw=0.8, label="live %")
    ax2.set_ylabel("% of allocated slots live")
    ax2.set_ylim(0, 105)
    axes[2].set_ylabel("KV pages")
    axes[2].set_xlabel("time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def service(t, curves: dict, diff, out_png: str | pathlib.Path) -> None:
    """Cumulative weighted service per client, and the service difference while all backlogged."""
    if len(t) == 0:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    t = np.asarray(t) - t[0]
    for c, v in curves.items():
        axes[0].plot(t, v, label=c)
    axes[0].set_xlabel("time (s)")
    axes[0].set_ylabel("service (weighted tokens)")
    axes[0].legend()
    axes[1].plot(t, diff)
    axes[1].set_xlabel("time (s)")
    axes[1].set_ylabel("max - min service, all backlogged")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
