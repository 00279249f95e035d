"""The small dense byte-level language model that the co-serving and S-LoRA experiments
(configs/cotrain.py, configs/slora.py) serve: 4 layers of width 128, or 2 of width 64 in
their `runlocal` variants (tests)."""


def small_model(local: bool, max_seq_len: int, **extra) -> dict:
    """A config's `model` section; `extra` adds fields (an MoE section)."""
    return dict(
        vocab_size=264,
        d_model=64 if local else 128,
        n_layers=2 if local else 4,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128 if local else 256,
        max_seq_len=max_seq_len,
        **extra,
    )
