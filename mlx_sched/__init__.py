"""mlx_sched: the host side of training and serving, in sub-packages by kind of code.

- `serve/`  the serving engine: requests, the page pool, the scheduler and its
            policies, the runner and its jitted steps, sampling, the engine loop,
            serving metrics. Imports `models` (the forward signature and the paged
            attention context) and `sharding`; of this package only `speculative`,
            lazily.
- `train/`  the training loop, optimizer, checkpoints, data, training plots.
            Imports `models` and `sharding`.
- `speculative/` speculative decoding: drafters and the engine's speculator. Imports
            `serve`; the engine reaches it lazily when `serve.speculative` is set.
- `lab/`    what experiments drive and measure the engine with: workloads and
            traces, replay, SLO and fairness metrics, the simulator, serving
            plots. Imports `serve` (and `models` for configs).
- `cotrain/` training and serving one model together (FineInfer's co-serving): a tuner
            of the MoE routers, norms or LoRA adapter and the loop that interleaves its steps with
            the engine's. Imports `serve` and `train`.
- `offload/` FlexGen-style offload: weights and KV of each layer on the device or host
            tier, a capped device budget, layer-by-layer streamed greedy generate, and
            the cost-model placement search. Imports `models`.
- `plotting.py` the headless matplotlib every package draws with.

The import graph is models <- mlx_sched <- experiments; only `sharding/` knows
mesh axis names; nothing here imports from `experiments/`.
"""
