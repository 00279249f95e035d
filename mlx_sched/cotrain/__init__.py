"""Training and serving one model together: FineInfer's co-serving (`coserve.CoServer`) of an
engine and a tuner of its MoE routers or norms (`tuner.Tuner`)."""

from mlx_sched.cotrain.coserve import CoServeConfig, CoServer
from mlx_sched.cotrain.tuner import Tuner, TunerConfig

__all__ = ["CoServeConfig", "CoServer", "Tuner", "TunerConfig"]
