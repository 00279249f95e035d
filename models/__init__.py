"""Flax NNX model code: Transformer, attention, MoE, checkpoint loaders.

Shape-suffix letter key, used in every file of this package:

    B batch            L query length        T key/context length
    D model (embed)    H query heads         K kv heads
    Q query heads per kv head (H = K * Q)    X head dim
    F feed-forward     V vocab               E experts
    C expert capacity  G routing groups      S tokens per group / slots
    P pages            Z tokens per page     N layers
    R experts chosen per token (top-k)       A routed (token, expert) pairs (T * R)
    I adapter rank (LoRA's r)

`x_BLD` is a [batch, length, d_model] array; `wq_DHX` a [d_model, heads,
head_dim] weight. `models/` knows nothing of scheduling.
"""

from models.config import ConfigError, ModelConfig
from models.moe_config import MoEConfig, check_servable
from models.transformer import Transformer

__all__ = ["ConfigError", "MoEConfig", "ModelConfig", "Transformer", "check_servable"]
