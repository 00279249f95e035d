"""Training: the loop (`loop.py`), its pure loss, train and eval steps (`steps.py`),
optimizer and schedule (`optim.py`), orbax checkpoints (`checkpoint.py`), byte-level data
(`data.py`) and training plots (`plots.py`).

May import `models` and `sharding`; never `mlx_sched.serve`, `mlx_sched.lab` or `experiments`.
"""
