"""FineInfer co-serving and MoE router tuning while serving (experiments/configs/cotrain.py).

  python -m experiments.cotrain                          # docs/results/cotrain.json + plot
  python -m experiments.cotrain --config=experiments/configs/cotrain.py:runlocal --workdir=/tmp/co

Pre-trains (or restores) a small MoE model, then serves one Poisson trace with it in each
mode (serving only, tuning only, strict time-sharing, FineInfer with each deferral bound)
while its routers are tuned on the training text; writes cotrain.json and cotrain.png to
--workdir and prints the table.
"""

from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", common.config_path("cotrain"), "co-serving config", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "docs/results", "where the JSON and plot go")


def main(argv):
    del argv
    from experiments import cotrain_runs
    from mlx_sched.serve import metrics

    config = _CONFIG.value
    workdir = common.require_workdir(_WORKDIR.value)
    results = cotrain_runs.run_all(config, workdir, progress=lambda s: print(s, flush=True))
    results["config"] = config.to_dict()
    metrics.write_json(workdir / "cotrain.json", results)
    paths = cotrain_runs.plots(results, workdir)
    print(cotrain_runs.table(results))
    print(f"results: {workdir / 'cotrain.json'}, plot: {', '.join(map(str, paths))}")


if __name__ == "__main__":
    common.run(main)
