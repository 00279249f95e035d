"""Llumnix on real engines: migration under load, migration downtime, priority headroom.

  python -m experiments.migration                       # writes to docs/results/
  python -m experiments.migration --config=experiments/configs/migration.py:runlocal \
      --workdir=/tmp/mig

Runs the studies of experiments/configs/migration.py through the public `Cluster` API
(`add_request(arrival=...)`, `step`, `migrate`, `summary`, `move_log`, `requests`) and
writes migration.json and migration_{latency,downtime,priority}.png to --workdir, with
a progress line per run and the result tables at the end. Instances are stepped one after
another in this process, so wall-clock latencies include every instance's step.
"""

from experiments import host_devices  # stdlib only

host_devices.simulate(8)  # one simulated CPU device per instance: before jax is imported

import time  # noqa: E402

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import common  # noqa: E402
from experiments import migration_report as report  # noqa: E402
from experiments.migration_studies import STUDIES  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", common.config_path("migration"), "migration config", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "docs/results", "where the JSON and plots go")


def main(argv):
    del argv
    import jax

    from mlx_sched.serve import metrics

    config = _CONFIG.value
    workdir = common.require_workdir(_WORKDIR.value)
    studies = [s for s in config.studies.split(",") if s]
    unknown = sorted(set(studies) - set(STUDIES))
    if unknown:
        raise common.ConfigError(f"unknown studies {unknown}; known: {sorted(STUDIES)}")
    results = {"config": config.to_dict(), "devices": f"{jax.device_count()} x {jax.devices()[0]}"}
    for name in studies:
        t0 = time.perf_counter()
        results[name] = STUDIES[name](config, workdir)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    metrics.write_json(workdir / "migration.json", results)
    print(report.tables(results))
    print(f"results: {workdir / 'migration.json'}, plots: {workdir}/migration_*.png")


if __name__ == "__main__":
    common.run(main)
