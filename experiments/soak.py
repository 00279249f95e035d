"""Soak: a long stream with every feature on, under a small KV pool, checked request by request.

  python -m experiments.soak                                  # 10,000 requests, ~15 min here
  python -m experiments.soak --requests=500 --policies=fcfs   # a quick look

Runs the stream once per (preemption mode, policy) and prints, per run:
requests, finished, aborted (and how many from inside output callbacks),
preemptions, outputs that differ from a never-preempting reference engine,
pages in use and host KV entries at the end, per-request state left, and RSS
at 10 / 50 / 100% of the stream. Exits 1 if any check fails. JSON in --workdir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

from absl import flags

from experiments import common

_REQUESTS = flags.DEFINE_integer("requests", 10_000, "requests per run")
_MODES = flags.DEFINE_list("modes", ["recompute", "swap"], "preemption modes")
_POLICIES = flags.DEFINE_list("policies", ["fcfs", "priority", "mlfq"], "scheduling policies")
_PAGES = flags.DEFINE_integer("num_pages", 64, "KV pages (small: preemption is the point)")
_WORKDIR = flags.DEFINE_string("workdir", "runs/soak", "where soak.json goes")


def main(argv):
    del argv
    from flax import nnx

    from mlx_sched.lab import soak
    from mlx_sched.serve.config import ServeConfig
    from models import Transformer

    workdir = common.claim_workdir(_WORKDIR.value)
    model = Transformer(soak.soak_model_config(), nnx.Rngs(0))
    base = ServeConfig(
        page_size=4,
        num_pages=_PAGES.value,
        max_seqs=16,
        token_budget=64,
        prefill_buckets=(16, 64),
        max_prefill_rows=2,
        slice_len=4,
        max_copies=2,
    )
    requests = soak.make_requests(_REQUESTS.value, model.cfg.vocab_size)
    logging.info("reference: %d requests on a pool that never preempts", len(requests))
    reference = soak.reference_outputs(model, base, requests)
    results, failed = {}, False
    for mode in _MODES.value:
        for policy in _POLICIES.value:
            args = {"preempt": True} if policy == "priority" else {}
            cfg = dataclasses.replace(base, preemption=mode, policy=policy, policy_args=args)
            name = f"{mode}/{policy}"
            logging.info("soak %s", name)
            res = soak.soak(
                model,
                cfg,
                requests,
                reference,
                progress=lambda d, n, name=name: logging.info("%s: %d/%d ended", name, d, n),
            )
            problems = soak.check(res)
            failed |= bool(problems)
            results[name] = {**vars(res), "problems": problems}
            print(
                f"{name:>18}: {res.requests} requests, {res.finished} finished, "
                f"{res.aborted} aborted ({res.aborted_in_callback} in callbacks), "
                f"{res.preemptions} preemptions, {res.mismatches} mismatches "
                f"(+{res.near_ties} float32 near-ties), "
                f"{res.pages_in_use} pages in use, {res.host_kv_entries} host KV entries, "
                f"RSS MiB {res.rss_mib}, {res.steps} steps in {res.seconds:.0f} s"
                + (f"  FAILED: {problems}" if problems else "")
            )
    (workdir / "soak.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"JSON in {workdir / 'soak.json'}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    common.run(main)
