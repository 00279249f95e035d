"""FlexGen-style offload: throughput against the device budget, predicted beside measured.

  python -m experiments.offload                   # docs/results/offload.json, docs/offload.png
  python -m experiments.offload --config=experiments/configs/offload.py:runlocal \
      --workdir=/tmp/offload --plot=/tmp/offload/offload.png

Runs `mlx_sched.offload.study` on the config of experiments/configs/offload.py and prints the
table of caps, chosen placements, measured and predicted throughput and time per token.
"""

import pathlib

from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", common.config_path("offload"), "offload config", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "docs/results", "where offload.json goes")
_PLOT = flags.DEFINE_string("plot", "docs/offload.png", "where the plot goes")


def main(argv):
    del argv
    import jax

    from mlx_sched.offload import study
    from mlx_sched.serve import metrics
    from models.config import ModelConfig

    c = _CONFIG.value
    workdir = common.require_workdir(_WORKDIR.value)
    sc = study.StudyConfig(
        model=ModelConfig.from_dict(c.model.to_dict()),
        batch=c.batch,
        prompt_len=c.prompt_len,
        max_tokens=c.max_tokens,
        cap_fractions=tuple(c.cap_fractions),
        runs=c.runs,
        seed=c.seed,
    )
    res = study.run(sc, log=lambda s: print(s, flush=True))
    res["config"] = c.to_dict()
    res["devices"] = f"{jax.device_count()} x {jax.devices()[0]}"
    metrics.write_json(workdir / "offload.json", res)
    plot = pathlib.Path(_PLOT.value)
    plot.parent.mkdir(parents=True, exist_ok=True)
    study.plot(res, plot)
    print(
        f"model: block weights + head {res['weights_mib']:.1f} MiB; all on device "
        f"{res['all_device_mib']:.1f} MiB; least placement {res['least_mib']:.1f} MiB"
    )
    print(study.table(res))
    print(f"results: {workdir / 'offload.json'}, plot: {plot}")


if __name__ == "__main__":
    common.run(main)
