"""Experiment support: what experiments drive and measure the engine with.

- `workload.py`  arrivals (Poisson, Gamma, on/off), length presets, per-client
                 streams, traces saved and replayed as JSONL
- `replay.py`    a trace through an engine, offline or in real time
- `slo.py`       SLO attainment, goodput, Jain's index, service difference, JCT
- `simulator.py` the engine's scheduler and policies against a modelled device
- `calibrate.py` the simulator's step time fitted per compiled shape to a real engine's
                 steps (device and host), and its error against the real engine
- `plots.py`     serving plots (latency CDFs, timelines, service curves)

May import `mlx_sched.serve` and `models`; never `experiments`.
"""
