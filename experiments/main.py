"""The main job: python -m experiments.main [--workdir=runs/main] [--config=...].

Trains a small language model on the embedded corpus (or reuses the run in
--workdir if it already finished), samples a few continuations, and says
where everything went.
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
    from mlx_sched import data, training
    from models import generate

    config = _CONFIG.value
    workdir = common.require_workdir(_WORKDIR.value)
    trainer, params, eval_loss = training.train_from_config(config, workdir)
    model = trainer.model(params)

    tok = data.ByteTokenizer()
    s = config.sample
    prompts = [tok.encode(p, bos=False) for p in s.prompts]
    outs = generate.generate(model, prompts, s.max_tokens, s.temperature, s.seed)
    lines = []
    for p, o in zip(s.prompts, outs, strict=True):
        lines.append(f"--- prompt {p!r}\n{p}{tok.decode(o)}\n")
    samples = "\n".join(lines)
    (workdir / "samples.txt").write_text(samples)
    print(samples)
    print(f"held-out loss {eval_loss:.3f} nats/byte ({eval_loss / 0.6931:.3f} bits/byte)")
    print(f"results in {workdir.absolute()}:")
    for name in ("metrics.jsonl", "loss.png", "samples.txt", "checkpoints/"):
        print(f"  {workdir.absolute() / name}")
    logging.flush()


if __name__ == "__main__":
    common.run(main)
