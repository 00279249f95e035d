"""S-LoRA: throughput and TTFT against the number of adapters (experiments/configs/slora.py).

  python -m experiments.slora                      # docs/results/slora.json + docs/slora.png
  python -m experiments.slora --config=experiments/configs/slora.py:runlocal --workdir=/tmp/sl \
      --plot=/tmp/sl/slora.png

Serves one Poisson trace per adapter count in each mode (unified paging, a fixed pool,
merging one adapter at a time into the weights); writes slora.json to --workdir, the plot
to --plot, and prints the table.
"""

import pathlib

from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", common.config_path("slora"), "S-LoRA config", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "docs/results", "where the JSON goes")
_PLOT = flags.DEFINE_string("plot", "docs/slora.png", "where the plot goes")


def main(argv):
    del argv
    from experiments import slora_runs
    from mlx_sched.serve import metrics

    config = _CONFIG.value
    workdir = common.require_workdir(_WORKDIR.value)
    results = slora_runs.run_all(config, progress=lambda s: print(s, flush=True))
    results["config"] = config.to_dict()
    metrics.write_json(workdir / "slora.json", results)
    png = slora_runs.plot(results, pathlib.Path(_PLOT.value))
    print(slora_runs.table(results))
    print(f"results: {workdir / 'slora.json'}, plot: {png}")


if __name__ == "__main__":
    common.run(main)
