"""The vLLM comparison: a random 44M-parameter Llama served on 32 requests of 128 -> 128 tokens.

  python -m experiments.bench_llama                    # float32 and bfloat16, 3 runs each
  python -m experiments.bench_llama --dtypes=bfloat16 --naive

The checkpoint (d 512, 8 layers, 8 heads, d_ff 1536, vocab 32k, tied embeddings:
43.7M parameters) is written once in Hugging Face format (config.json +
safetensors) and loaded through the same loader a user's checkpoint would use.
Throughput counts prompt + output tokens over the wall time from the first
request to the last token, after warm-up (vLLM's benchmark_throughput
"total tokens/s"). The reference numbers are those of a community CPU build of
vLLM on this machine on the same model and requests: 866 tok/s in float32 and
2,136 tok/s in bfloat16. --naive also times the full-recompute reference loop
(no KV cache) on the same requests.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
from absl import flags

from experiments import common

_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes to measure")
_RUNS = flags.DEFINE_integer("runs", 3, "timed runs per dtype (best and median reported)")
_CKPT = flags.DEFINE_string("checkpoint", "runs/llama44m", "where the random HF checkpoint lives")
_NAIVE = flags.DEFINE_bool("naive", False, "also time the naive full-recompute loop")
_SLICE = flags.DEFINE_integer("slice_len", 8, "decode iterations per engine call")

VLLM = {"float32": 866.0, "bfloat16": 2136.0}
N_REQ, PROMPT, OUTPUT = 32, 128, 128


def make_checkpoint(path: pathlib.Path, model_config) -> None:
    from flax import nnx

    from models import ModelConfig, Transformer, hf

    if (path / "config.json").exists():
        return
    hf.save_llama(Transformer(ModelConfig.from_dict(model_config), nnx.Rngs(0)), path)


def main(argv):
    del argv
    from experiments.configs import serve as serve_configs
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.serve.engine import Engine
    from mlx_sched.serve.request import SamplingParams
    from models import generate, hf

    config = serve_configs.get_config("llama44m")  # the model and engine settings
    path = pathlib.Path(_CKPT.value)
    make_checkpoint(path, config.model)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, 32000, PROMPT))) for _ in range(N_REQ)]
    sampling = SamplingParams(max_tokens=OUTPUT, ignore_eos=True)
    serve = ServeConfig.from_dict({**config.serve.to_dict(), "slice_len": _SLICE.value})
    assert serve.max_seqs == N_REQ and serve.max_len(config.model.max_seq_len) == PROMPT + OUTPUT
    results = {}
    for dtype in _DTYPES.value:
        model = hf.load_model(path, dtype=dtype)
        engine = Engine(model, serve)
        engine.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True))  # warm caches
        walls = []
        for _ in range(_RUNS.value):
            t0 = time.perf_counter()
            outs = engine.generate(prompts, sampling)
            walls.append(time.perf_counter() - t0)
            assert all(len(o.outputs[0]) == OUTPUT for o in outs)
        tokens = N_REQ * (PROMPT + OUTPUT)
        best, med = min(walls), float(np.median(walls))
        r = {
            "total_tok_s_best": tokens / best,
            "total_tok_s_median": tokens / med,
            "output_tok_s_best": N_REQ * OUTPUT / best,
            "vllm_total_tok_s": VLLM[dtype],
            "ratio_vs_vllm_best": tokens / best / VLLM[dtype],
            "compiles_after_warmup": engine.runner.compiles_since_warmup,
            "native_decode_kernel": engine.runner.kernel.native,
        }
        if _NAIVE.value:
            t0 = time.perf_counter()
            generate.generate(model, prompts, OUTPUT)
            r["naive_total_tok_s"] = tokens / (time.perf_counter() - t0)
        results[dtype] = r
    print(
        f"\n{N_REQ} requests x ({PROMPT} prompt + {OUTPUT} output) tokens, random 44M Llama "
        f"({path}), slice_len={_SLICE.value}, best (median) of {_RUNS.value}"
    )
    print(
        "| dtype | total tok/s | output tok/s | vLLM total tok/s | ours / vLLM |"
        + (" naive loop tok/s |" if _NAIVE.value else "")
    )
    print("|---|---|---|---|---|" + ("---|" if _NAIVE.value else ""))
    for dtype, r in results.items():
        row = (
            f"| {dtype} | {r['total_tok_s_best']:,.0f} ({r['total_tok_s_median']:,.0f}) "
            f"| {r['output_tok_s_best']:,.0f} | {r['vllm_total_tok_s']:,.0f} "
            f"| {r['ratio_vs_vllm_best']:.2f}x |"
        )
        if _NAIVE.value:
            row += f" {r['naive_total_tok_s']:,.0f} |"
        print(row)
    print(
        f"compilations after warm-up: {[r['compiles_after_warmup'] for r in results.values()]}; "
        f"native decode kernel: {[r['native_decode_kernel'] for r in results.values()]}"
    )
    (path / "bench_llama.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    common.run(main)
