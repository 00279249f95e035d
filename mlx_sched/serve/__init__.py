"""The serving engine: `Engine.step()` = schedule -> run -> postprocess.

- `request.py`  requests, sequences, sampling parameters, step outputs, validation
- `paging.py`   the host page pool: refcounts, copy-on-write, prefix cache
- `kv_store.py` host copies of sequences' KV pages (swap; later transfer, offload)
- `plan.py`     `StepPlan`: per sequence how many positions it computes, and the
                KV movement (copies, swap out/in, send/receive) around the step
- `scheduler.py` mechanisms policies use: reserve, admit, fork, preempt, swap
- `policies/`   one file per scheduling policy, registered by a decorator
- `shapes.py`   `shape_for(plan)`: the compiled bucket a plan runs in
- `runner.py`, `steps.py`, `sampling.py`  the device side: fixed-shape batches,
                the jitted steps, on-device sampling
- `engine.py`   the loop; `metrics.py` per-request and per-step metrics
- `config.py`   `ServeConfig`; `cost_model.py` step-time estimates for policies

May import `models` and `sharding`, and `mlx_sched.speculative` lazily (the engine, when
`serve.speculative` is set); never `mlx_sched.train`, `mlx_sched.lab` or `experiments`.
"""
