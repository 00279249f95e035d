"""FlexGen's cost model and the placement search over it.

A layer of one step costs max(compute, read, write): compute = FLOPs / throughput plus a fixed
per-layer overhead (dispatch and the per-layer sync), read = bytes streamed into the device tier
(host-resident weights, and the whole cache of a host-resident KV) / the host-to-device
bandwidth, write = the step's new KV entries of a host-resident KV / the device-to-host
bandwidth. FlexGen assumes the three overlap fully; `Hardware.overlap` (measured by
`calibrate`: 1 is full overlap, 0 none) adds back the share that does not hide, since on a
CPU the copies and the compute share cores and memory bandwidth. A run is the prefill plus
`max_tokens - 1` decode steps (the generate loop's attention reads the whole cache every
step, so every decode step costs the same).

The search enumerates FlexGen's small space exhaustively: the number of layers whose weights
are resident x the number whose KV is resident (`Placement.first`), keeps those that fit the
cap (`tiers.required_bytes`) and returns the fastest, fewer streamed bytes breaking ties.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlx_sched.offload import tiers
from models.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Measured constants (defaults: this 2-core CPU, float32, roughly): matmul throughput at
    decode (one token per row) and prefill row counts, transfer bandwidths, per-layer overhead."""

    decode_flops_per_s: float = 1.5e10
    prefill_flops_per_s: float = 3e10
    h2d_bytes_per_s: float = 1.5e9
    d2h_bytes_per_s: float = 1.5e9
    layer_overhead_s: float = 3e-4
    overlap: float = 1.0  # share of the shorter of compute and transfers hidden under the longer


@dataclasses.dataclass(frozen=True)
class LayerCost:
    compute_s: float
    read_s: float
    write_s: float

    overlap: float = 1.0

    @property
    def seconds(self) -> float:
        """max(compute, read, write) (FlexGen), plus what the overlap does not hide."""
        parts = (self.compute_s, self.read_s, self.write_s)
        return max(parts) + (1.0 - self.overlap) * (sum(parts) - max(parts))


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The cost model's figures for one placement: per layer of a decode step, per decode step
    (a generated token of every row), the prefill, and the whole run; its device bytes."""

    placement: tiers.Placement
    layer_s: tuple[float, ...]
    token_s: float
    prefill_s: float
    total_s: float
    required_bytes: int
    streamed_bytes: int


# -- the model ---------------------------------------------------------------------------------


def layer_flops(cfg: ModelConfig, layer: int, batch: int, query_len: int, cache_len: int) -> float:
    """Matmul FLOPs of one block for batch x query_len tokens over a cache of cache_len."""
    D, H, K, X, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    tokens = batch * query_len
    proj = 2 * D * (2 * H * X + 2 * K * X)
    if cfg.moe is not None and cfg.moe.is_moe_layer(layer):
        mlp = 2 * D * cfg.moe.num_experts + cfg.moe.top_k * 6 * D * F
    else:
        mlp = 6 * D * F
    attn = 4 * H * X * cache_len  # scores and probabilities x values over the whole cache
    return tokens * (proj + mlp + attn)


def layer_cost(
    cfg: ModelConfig,
    hw: Hardware,
    layer: int,
    placement: tiers.Placement,
    batch: int,
    query_len: int,
    cache_len: int,
) -> LayerCost:
    flops = layer_flops(cfg, layer, batch, query_len, cache_len)
    rate = hw.decode_flops_per_s if query_len == 1 else hw.prefill_flops_per_s
    read = 0 if placement.weights_on_device[layer] else tiers.layer_bytes(cfg, layer)
    write = 0
    if not placement.kv_on_device[layer]:
        read += tiers.kv_bytes(cfg, batch, cache_len)
        write = tiers.kv_bytes(cfg, batch, query_len)
    return LayerCost(
        compute_s=flops / rate + hw.layer_overhead_s,
        read_s=read / hw.h2d_bytes_per_s,
        write_s=write / hw.d2h_bytes_per_s,
        overlap=hw.overlap,
    )


def predict(
    cfg: ModelConfig,
    hw: Hardware,
    placement: tiers.Placement,
    batch: int,
    prompt_len: int,
    max_tokens: int,
) -> Prediction:
    """The cost model's time for offloaded generate of `batch` prompts of `prompt_len` tokens
    (padded length) continued by `max_tokens` tokens under `placement`."""
    T = prompt_len + max_tokens - 1
    n = range(cfg.n_layers)
    layer_s = tuple(layer_cost(cfg, hw, i, placement, batch, 1, T).seconds for i in n)
    prefill_s = sum(layer_cost(cfg, hw, i, placement, batch, prompt_len, T).seconds for i in n)
    token_s = sum(layer_s)
    return Prediction(
        placement=placement,
        layer_s=layer_s,
        token_s=token_s,
        prefill_s=prefill_s,
        total_s=prefill_s + (max_tokens - 1) * token_s,
        required_bytes=tiers.required_bytes(cfg, placement, batch, prompt_len, T),
        streamed_bytes=sum(tiers.streamed_bytes(cfg, placement, batch, T)),
    )


# -- the search --------------------------------------------------------------------------------


def candidates(n_layers: int) -> list[tiers.Placement]:
    """The search space: (weight-resident layers, KV-resident layers), each 0..n_layers."""
    return [
        tiers.Placement.first(n_layers, w, k)
        for w in range(n_layers + 1)
        for k in range(n_layers + 1)
    ]


def search(
    cfg: ModelConfig,
    hw: Hardware,
    batch: int,
    prompt_len: int,
    max_tokens: int,
    cap_bytes: int | None,
) -> Prediction:
    """The fastest placement under the cap by the cost model (ties: fewer streamed bytes)."""
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    if prompt_len < 1 or max_tokens < 1:
        raise ConfigError(f"prompt_len and max_tokens must be >= 1, got {prompt_len}, {max_tokens}")
    preds = [predict(cfg, hw, p, batch, prompt_len, max_tokens) for p in candidates(cfg.n_layers)]
    fits = [p for p in preds if cap_bytes is None or p.required_bytes <= cap_bytes]
    if not fits:
        least = min(p.required_bytes for p in preds)
        raise tiers.BudgetError(
            f"device budget {tiers._mib(cap_bytes)} is smaller than one layer streamed with its "
            f"prefetch plus the head and activations ({tiers._mib(least)} at batch {batch})"
        )
    return min(fits, key=lambda p: (p.total_s, p.streamed_bytes))


# -- calibration -------------------------------------------------------------------------------


def _seconds(fn, *args, repeats: int) -> float:
    """Least wall time of fn(*args) to ready results, after a warm-up call: the machine's
    figure with the least interference from other processes (the cores are shared)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def _one_layer(graphdef, params, x_TD, kv_shape, pos_BL):
    from mlx_sched.offload.generate import layer_step

    k, v = (jnp.zeros(kv_shape, x_TD.dtype) for _ in "kv")
    return layer_step(graphdef, params, x_TD, k, v, pos_BL)


def calibrate(
    model: nnx.Module,
    batch: int,
    prompt_len: int,
    max_tokens: int,
    repeats: int = 10,
    nbytes: int = 32 << 20,
) -> Hardware:
    """Measure this machine's constants: the model's first block at decode and prefill shapes
    (device-resident, as the generate loop runs it, each call waited for) gives the throughput
    in FLOPs/s beyond a tiny jitted call's overhead; host<->device copies of `nbytes`."""
    cfg = model.cfg
    on_device, on_host = tiers.shardings()
    T = prompt_len + max_tokens - 1
    x_TD = jnp.ones((batch, cfg.d_model), cfg.compute_dtype)
    overhead = _seconds(jax.jit(lambda a: a + 1), x_TD, repeats=20 * repeats)
    graphdef, params = nnx.split(model.layers[0])
    kv_shape = (batch, T, cfg.n_kv_heads, cfg.head_dim)
    rates, args = [], {}
    for L in (1, prompt_len):
        pos_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (batch, L))
        x_TD = jnp.ones((batch * L, cfg.d_model), cfg.compute_dtype)
        args[L] = (graphdef, params, x_TD, kv_shape, pos_BL)
        seconds = _seconds(_one_layer, *args[L], repeats=repeats)
        rates.append(layer_flops(cfg, 0, batch, L, T) / max(seconds - overhead, 1e-9))
    overlap = _overlap(args[1], on_device, on_host, repeats)
    host = np.ones(nbytes // 4, np.float32)
    if on_host is not None:
        host = jax.device_put(host, on_host)
    dev = jax.device_put(host, on_device)
    put = lambda a, s: jax.device_put(a, s)  # noqa: E731
    h2d = nbytes / _seconds(put, host, on_device, repeats=repeats)
    if on_host is not None:
        d2h = nbytes / _seconds(put, dev, on_host, repeats=repeats)
    else:
        d2h = nbytes / _seconds(jax.device_get, dev, repeats=repeats)
    return Hardware(rates[0], rates[1], h2d, d2h, overhead, overlap)


def _overlap(layer_args, on_device, on_host, repeats: int) -> float:
    """The share of the shorter of (a decode layer's compute, a copy of its weights to the
    device) that hides under the longer when both are issued together: 1 is FlexGen's max()."""
    params = layer_args[1]
    host = jax.device_put(params, on_host) if on_host is not None else jax.device_get(params)
    read = functools.partial(jax.device_put, host, on_device)
    t_c = _seconds(_one_layer, *layer_args, repeats=repeats)
    t_r = _seconds(read, repeats=repeats)
    t_both = _seconds(lambda: (read(), _one_layer(*layer_args)), repeats=repeats)
    return float(np.clip((t_c + t_r - t_both) / min(t_c, t_r), 0.0, 1.0))
