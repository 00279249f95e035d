"""Many engines: a global scheduler over instances (in process or Ray actors), dispatch,
prefill/decode disaggregation (DistServe), live migration (Llumnix), fault recovery."""

from mlx_sched.cluster.backends import ClusterError, InstanceDead, LocalInstance
from mlx_sched.cluster.cluster import Cluster
from mlx_sched.cluster.config import ClusterConfig
from mlx_sched.cluster.instance import InstanceServer, Load
from mlx_sched.cluster.records import ClusterOutput, ClusterRequest

__all__ = [
    "Cluster",
    "ClusterConfig",
    "ClusterError",
    "ClusterOutput",
    "ClusterRequest",
    "InstanceDead",
    "InstanceServer",
    "Load",
    "LocalInstance",
]
