"""The main job: python -m experiments.main [--workdir=runs/main] [--config=...].

Trains a small language model on the embedded corpus (or reuses the run in
--workdir if it already finished), serves a synthetic trace through the
engine (continuous batching, chunked prefill, paged KV, slice decode),
prints the metrics table and a few samples, and says where everything went.
"""

from absl import flags, logging
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", common.config_path("main", "default"), "main-job config", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/main", "run folder")


def main(argv):
    del argv
    from experiments import serving
    from mlx_sched.serve import metrics
    from mlx_sched.serve.request import SamplingParams
    from mlx_sched.train import data, loop, plots

    config = _CONFIG.value
    common.require_sections(
        config,
        flags.FLAGS["config"].config_filename,
        ("train", "serve", "workload", "sample"),
        "experiments.main trains and then serves, which needs a config with both "
        "(experiments/configs/main.py); to only train use experiments.train, to only serve "
        "experiments.bench_serving",
    )
    workdir = common.claim_workdir(_WORKDIR.value)
    trainer, params, eval_loss = loop.train_from_config(config, workdir)
    model = trainer.model(params)

    logging.info("serving: compiling the engine's step shapes")
    engine = serving.make_engine(model, config)
    tok = data.ByteTokenizer()
    s = config.sample
    stops = (ord("\n"),) if s.stop_at_newline else ()
    sampling = [
        SamplingParams(
            max_tokens=s.max_tokens, temperature=s.temperature, seed=s.seed + i, stop_tokens=stops
        )
        for i in range(len(s.prompts))
    ]
    prompts = [tok.encode(p) for p in s.prompts]
    outs = engine.generate(prompts, sampling)
    samples = "\n".join(
        f"{p}{tok.decode(o.outputs[0])}" for p, o in zip(s.prompts, outs, strict=True)
    )
    (workdir / "samples.txt").write_text(samples + "\n")

    trace = serving.make_trace(model, config, trainer.corpus.heldout)
    summary = serving.run(serving.make_engine(model, config), trace, config, workdir)
    print("\n== samples (one line each, sampled by the engine)")
    print(samples)
    print(f"\nheld-out loss {eval_loss:.3f} nats/byte ({eval_loss / 0.6931:.3f} bits/byte)")
    for line in plots.router_summary(workdir / "metrics.jsonl"):
        print(line)
    w, S = config.workload, config.serve.slice_len
    print(f"\n== serving {len(trace)} requests, Poisson {w.rate}/s, slice_len={S}")
    print(metrics.format_table(summary))
    print(f"compilations after warm-up: {summary['compiles_after_warmup']}")
    print(f"\nresults in {workdir.absolute()}:")
    for name in (
        "metrics.jsonl",
        "loss.png",
        "samples.txt",
        "serving.json",
        "serving_latency.png",
        "serving_timeline.png",
        "checkpoints/",
    ):
        print(f"  {workdir.absolute() / name}")
    logging.flush()


if __name__ == "__main__":
    common.run(main)
