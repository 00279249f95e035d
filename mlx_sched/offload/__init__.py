"""FlexGen-style offload: layers' weights and KV in a device and a host tier, streamed layer
by layer for throughput-oriented batch generation, and a cost-model search for the placement.

- `tiers.py`     `Placement`, the `DeviceBudget` and byte sizes; JAX memory kinds.
- `generate.py`  offloaded greedy `generate` over a padded batch, double-buffered streaming.
- `cost.py`      FlexGen's cost model, its calibration, and the placement search.
"""

from mlx_sched.offload.generate import Generation, OffloadedModel, generate
from mlx_sched.offload.tiers import BudgetError, DeviceBudget, Placement

__all__ = ["BudgetError", "DeviceBudget", "Generation", "OffloadedModel", "Placement", "generate"]
