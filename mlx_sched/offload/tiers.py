"""Memory tiers: where each layer's weights and KV cache live, and the device tier's byte budget.

A `Placement` says, per layer, whether its weights and its KV cache are resident in the
device tier or kept in the host tier and streamed in when the layer runs. A `DeviceBudget`
counts the bytes resident in the device tier at every moment and refuses anything that
would exceed its cap. Byte sizes come from the model config (`layer_bytes`, `kv_bytes`,
`activation_bytes`), so the cost model and the generate loop charge the same figures.

Memory kinds: where the backend has a host memory kind (`pinned_host`, else
`unpinned_host`) besides `device`, host-tier weights are arrays in that memory kind and
streaming is a `jax.device_put` into the `device` kind. XLA:CPU exposes `device`,
`pinned_host` and `unpinned_host`, all the same RAM: the copy is real work, but the
capacity limit of the device tier is only the budget's cap.

Letters as in models/__init__.py: B batch, T cache length, K kv heads, X head dim.
"""

from __future__ import annotations

import dataclasses

import jax

from models.config import ConfigError, ModelConfig
from models.moe_config import MoEConfig


class BudgetError(ConfigError):
    """A placement or allocation does not fit the device tier's cap."""


# -- memory kinds ------------------------------------------------------------------------------


def memory_kinds(device: jax.Device | None = None) -> tuple[str | None, str | None]:
    """(device kind, host kind) of `device`; a None host kind: no host memory kind here."""
    device = device or jax.devices()[0]
    try:
        kinds = {m.kind for m in device.addressable_memories()}
        default = device.default_memory().kind
    except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
        return None, None
    host = next((k for k in ("pinned_host", "unpinned_host") if k in kinds), None)
    return default, host


def shardings(device: jax.Device | None = None):
    """(device-tier sharding, host-tier sharding or None for numpy host copies)."""
    device = device or jax.devices()[0]
    dev_kind, host_kind = memory_kinds(device)
    on_device = jax.sharding.SingleDeviceSharding(device, memory_kind=dev_kind)
    on_host = (
        jax.sharding.SingleDeviceSharding(device, memory_kind=host_kind) if host_kind else None
    )
    return on_device, on_host


# -- placement ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Placement:
    """Per layer: weights resident on the device tier (True) or streamed from the host;
    KV cache resident on the device tier (True) or kept on the host."""

    weights_on_device: tuple[bool, ...]
    kv_on_device: tuple[bool, ...]

    def __post_init__(self):
        object.__setattr__(self, "weights_on_device", tuple(map(bool, self.weights_on_device)))
        object.__setattr__(self, "kv_on_device", tuple(map(bool, self.kv_on_device)))
        if len(self.weights_on_device) != len(self.kv_on_device):
            raise ConfigError(
                f"placement has {len(self.weights_on_device)} weight flags but "
                f"{len(self.kv_on_device)} KV flags; give one of each per layer"
            )

    @classmethod
    def first(cls, n_layers: int, weights: int, kv: int) -> Placement:
        """The first `weights` layers' weights and the first `kv` layers' KV on the device."""
        if not (0 <= weights <= n_layers and 0 <= kv <= n_layers):
            raise ConfigError(f"weights={weights}, kv={kv} must be in [0, {n_layers}]")
        return cls(
            tuple(i < weights for i in range(n_layers)), tuple(i < kv for i in range(n_layers))
        )

    @property
    def n_layers(self) -> int:
        return len(self.weights_on_device)

    def describe(self) -> str:
        return f"weights {sum(self.weights_on_device)}/{self.n_layers} on device, " + (
            f"KV {sum(self.kv_on_device)}/{self.n_layers} on device"
        )


# -- sizes -------------------------------------------------------------------------------------


def _itemsize(dtype_name: str) -> int:
    return {"float32": 4, "bfloat16": 2}[dtype_name]


def layer_params(cfg: ModelConfig, layer: int) -> int:
    """Parameters of one block: attention, two norms, MLP or MoE (router + experts)."""
    D, H, K, X, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    attn = D * H * X * 2 + D * K * X * 2
    moe: MoEConfig | None = cfg.moe
    if moe is not None and moe.is_moe_layer(layer):
        mlp = D * moe.num_experts + moe.num_experts * 3 * D * F
    else:
        mlp = 3 * D * F
    return attn + mlp + 2 * D


def layer_bytes(cfg: ModelConfig, layer: int) -> int:
    return layer_params(cfg, layer) * _itemsize(cfg.param_dtype)


def head_bytes(cfg: ModelConfig) -> int:
    """Embedding, final norm and (untied) output head: always resident on the device tier."""
    n = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2) + cfg.d_model
    return n * _itemsize(cfg.param_dtype)


def kv_bytes(cfg: ModelConfig, batch: int, length: int) -> int:
    """K and V of one layer for `batch` rows of `length` positions (compute dtype)."""
    return 2 * batch * length * cfg.n_kv_heads * cfg.head_dim * _itemsize(cfg.dtype)


def activation_bytes(cfg: ModelConfig, batch: int, query_len: int, cache_len: int) -> int:
    """An upper estimate of one layer's live activations: the residual stream, q/k/v and
    attention output, the MLP's hidden states (x 3), float32 scores and the logits."""
    T = batch * query_len
    D, H, X, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    if cfg.moe is not None:
        F *= cfg.moe.top_k
    dt = _itemsize(cfg.dtype)
    per_layer = T * (2 * D + 2 * H * X + 2 * cfg.n_kv_heads * X + 3 * F) * dt
    scores = T * H * cache_len * 4 * 2  # scores and probabilities
    logits = batch * cfg.vocab_size * 4 + T * D * 4
    return per_layer + scores + logits


# -- the device tier's budget ------------------------------------------------------------------


class DeviceBudget:
    """Bytes resident in the device tier, by tag; `reserve` refuses to pass `cap_bytes`.

    `peak_bytes` is the most ever resident at once. A cap of None counts without a limit.
    """

    def __init__(self, cap_bytes: int | None):
        if cap_bytes is not None and cap_bytes <= 0:
            raise BudgetError(f"device budget must be > 0 bytes, got {cap_bytes}")
        self.cap_bytes = cap_bytes
        self.held: dict[str, int] = {}
        self.peak_bytes = 0

    @property
    def resident_bytes(self) -> int:
        return sum(self.held.values())

    def reserve(self, tag: str, nbytes: int) -> None:
        if tag in self.held:
            raise ValueError(f"'{tag}' is already resident")
        now = self.resident_bytes + nbytes
        if self.cap_bytes is not None and now > self.cap_bytes:
            raise BudgetError(
                f"device budget exceeded: {tag} needs {_mib(nbytes)} with {_mib(now - nbytes)} "
                f"resident, cap {_mib(self.cap_bytes)}"
            )
        self.held[tag] = nbytes
        self.peak_bytes = max(self.peak_bytes, now)

    def release(self, tag: str) -> None:
        del self.held[tag]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def streamed_bytes(cfg: ModelConfig, placement: Placement, batch: int, cache_len: int) -> list[int]:
    """Per layer, the bytes streamed into the device tier when it runs (weights and/or KV)."""
    kv = kv_bytes(cfg, batch, cache_len)
    return [
        (0 if w else layer_bytes(cfg, i)) + (0 if k else kv)
        for i, (w, k) in enumerate(
            zip(placement.weights_on_device, placement.kv_on_device, strict=True)
        )
    ]


def required_bytes(
    cfg: ModelConfig, placement: Placement, batch: int, prompt_len: int, cache_len: int
) -> int:
    """The peak device-tier bytes of offloaded generate under `placement`: the head, resident
    weights and KV, the prefill's activations, and the two streamed layers (the one computing
    and the next one, prefetched) that are largest together."""
    if placement.n_layers != cfg.n_layers:
        raise ConfigError(f"placement has {placement.n_layers} layers, model {cfg.n_layers}")
    kv = kv_bytes(cfg, batch, cache_len)
    fixed = head_bytes(cfg) + activation_bytes(cfg, batch, prompt_len, cache_len)
    fixed += sum(layer_bytes(cfg, i) for i, w in enumerate(placement.weights_on_device) if w)
    fixed += kv * sum(placement.kv_on_device)
    s = streamed_bytes(cfg, placement, batch, cache_len)
    return fixed + max(a + b for a, b in zip(s, s[1:] + [0], strict=True))


def check_fits(
    cfg: ModelConfig,
    placement: Placement,
    batch: int,
    prompt_len: int,
    cache_len: int,
    cap_bytes: int | None,
) -> int:
    """required_bytes, or a one-line BudgetError if it passes the cap."""
    need = required_bytes(cfg, placement, batch, prompt_len, cache_len)
    if cap_bytes is not None and need > cap_bytes:
        least = required_bytes(
            cfg, Placement.first(cfg.n_layers, 0, 0), batch, prompt_len, cache_len
        )
        raise BudgetError(
            f"placement ({placement.describe()}) needs {_mib(need)} of device memory at "
            f"batch {batch}, cap {_mib(cap_bytes)}; the least any placement needs is {_mib(least)}"
        )
    return need
