"""Train a language model: python -m experiments.train --config=...:variant --workdir=DIR."""

from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", common.config_path("lm", "default"), "experiment config", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: metrics, plots, checkpoints")
_MALLOC = flags.DEFINE_enum(
    "malloc",
    "retain",
    ["system", "retain"],
    "retain: glibc keeps freed memory (mlx_sched.train.memory; ~1.1x faster steps on CPU)",
)
common.define_distributed_flags()


def main(argv):
    del argv
    if _MALLOC.value == "retain":  # before JAX starts its backend
        from mlx_sched.train.memory import retain_freed_memory

        if not retain_freed_memory():
            print("warning: --malloc=retain needs glibc's mallopt; using the system's malloc")
    common.init_distributed()
    from mlx_sched.train import loop

    loop.train_from_config(_CONFIG.value, common.claim_workdir(_WORKDIR.value))


if __name__ == "__main__":
    common.run(main)
