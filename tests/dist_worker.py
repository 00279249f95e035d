"""One process of a multi-process training run (driven by test_distributed.py).

usage: python tests/dist_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES WORKDIR
"""

import os
import sys

pid, nproc, port, ndev, workdir = sys.argv[1:6]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"

import sharding  # noqa: E402

if int(nproc) > 1:
    sharding.initialize(f"127.0.0.1:{port}", int(nproc), int(pid))

from experiments.configs import lm  # noqa: E402
from mlx_sched.train import loop  # noqa: E402

config = lm.get_config("runlocal")
config.mesh.update(data=-1, tensor=2)
config.train.update(steps=4, log_every=1, eval_every=2, ckpt_every=2)
loop.train_from_config(config, workdir)
