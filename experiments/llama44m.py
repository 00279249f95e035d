"""The 44M Llama of the vLLM comparison: its config, its engine presets, its checkpoint and
traces (shared by experiments.bench_llama and experiments.profile_engine)."""

from __future__ import annotations

import pathlib

import numpy as np

MODEL = dict(
    vocab_size=32000,
    d_model=512,
    n_layers=8,
    n_heads=8,
    n_kv_heads=8,
    d_ff=1536,
    max_seq_len=2048,
    tie_embeddings=True,
)
KV_BYTES = 4 << 30  # vLLM's VLLM_CPU_KVCACHE_SPACE=4
TRACES = {
    "fixed": dict(n=32, prompt=(128, 128), output=(128, 128), rate=0.0),
    "varied": dict(n=64, prompt=(32, 512), output=(16, 256), rate=0.0),
    "online": dict(n=64, prompt=(32, 256), output=(16, 128), rate=8.0),
}


def make_trace(name: str, vocab: int, seed: int = 0) -> list[dict]:
    spec = TRACES[name]
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    for _ in range(spec["n"]):
        if spec["rate"]:
            t += float(rng.exponential(1.0 / spec["rate"]))
        n_in = int(rng.integers(spec["prompt"][0], spec["prompt"][1] + 1))
        n_out = int(rng.integers(spec["output"][0], spec["output"][1] + 1))
        ids = list(map(int, rng.integers(3, vocab, n_in)))
        out.append({"arrival_s": t, "prompt_ids": ids, "max_new_tokens": n_out})
    return out


def preset_fields(preset: str, dtype: str) -> dict:
    """The ServeConfig fields a preset sets: vLLM's context and KV memory over the defaults."""
    from mlx_sched.serve.config import ServeConfig

    per_token = 2 * MODEL["n_layers"] * MODEL["d_model"] * (4 if dtype == "float32" else 2)
    page_size = ServeConfig().page_size
    cfg = dict(max_context=1024, num_pages=KV_BYTES // (per_token * page_size), history=-1)
    if preset == "throughput":
        cfg.update(token_budget=2048, slice_len=8)
    return cfg


def serve_config(preset: str, dtype: str):
    """The engine settings of a preset: ServeConfig's defaults with vLLM's context and KV memory."""
    from mlx_sched.serve.config import ServeConfig

    return ServeConfig(**preset_fields(preset, dtype))


def make_checkpoint(path: pathlib.Path) -> None:
    from flax import nnx

    from models import ModelConfig, Transformer, hf

    if not (path / "config.json").exists():
        hf.save_llama(Transformer(ModelConfig(**MODEL), nnx.Rngs(0)), path)
