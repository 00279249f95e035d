"""Serving benchmark: replay a synthetic trace and report throughput, latency and overheads.

  python -m experiments.bench_serving                                   # 1,000 requests, offline
  python -m experiments.bench_serving --config=experiments/configs/serve.py:online
  python -m experiments.bench_serving --config=experiments/configs/serve.py:decode --slice_lens=1,8

Reports throughput, TTFT/TPOT/ITL percentiles, compilations after warm-up,
the host share of step time (scheduling + batch building + postprocess) and
the share of allocated KV slots holding live tokens. With several
--slice_lens the same trace is served once per slice length and the decode
throughputs are compared as ratios measured in one run.

Outputs go to --workdir, named by variant and slice length (`serving_online_S8.json`,
`bench_serving_online.json`, ...), so the variants can share one workdir.
Policy settings: `--config.serve.policy=vtc "--config.serve.policy_args={'weights': {'a': 2.0}}"`.
"""

from __future__ import annotations

import json
import logging
import pathlib

from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", common.config_path("serve", "default"), "serving config", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench_serving", "where JSON and plots go")
_SLICES = flags.DEFINE_list("slice_lens", [], "slice lengths to compare (default: the config's)")


def main(argv):
    del argv
    from experiments import serving
    from mlx_sched.serve import metrics
    from mlx_sched.train.data import load_corpus

    config = _CONFIG.value
    workdir = common.require_workdir(_WORKDIR.value)
    variant = common.config_tag(flags.FLAGS["config"].config_filename, home="serve")
    model = serving.load_model(config)
    corpus = load_corpus().heldout if model.cfg.vocab_size >= 259 else None
    trace = serving.make_trace(model, config, corpus)
    slices = [int(s) for s in _SLICES.value] or [config.serve.slice_len]
    results = {}
    for S in slices:
        logging.info("slice_len=%d: warming up", S)
        engine = serving.make_engine(model, config, slice_len=S)
        summary = serving.run(engine, trace, config, workdir, tag=f"{variant}_S{S}")
        results[S] = summary
        mode = "online" if config.workload.online else "offline"
        print(
            f"\n== {variant}, slice_len={S}  ({len(trace)} requests, {mode}, "
            f"{serving.devices_note()})"
        )
        print(metrics.format_table(summary))
        print(f"compilations after warm-up: {summary['compiles_after_warmup']}")
        print(f"decode tok/s (decode steps only): {summary['decode_tok_s']:.1f}")
    if len(slices) > 1:
        base = results[slices[0]]["decode_tok_s"]
        for S in slices[1:]:
            print(f"decode tok/s S={S} / S={slices[0]}: {results[S]['decode_tok_s'] / base:.2f}x")
    out = pathlib.Path(workdir) / f"bench_serving_{variant}.json"
    out.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2, default=str))
    print(f"\nJSON and plots in {workdir}: {out.name}, serving_{variant}_S*")


if __name__ == "__main__":
    common.run(main)
