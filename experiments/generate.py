"""Offline generation: text in, text out, from a training run or a Hugging Face folder.

  python -m experiments.generate --checkpoint=runs/lm --prompt='def '
  python -m experiments.generate --hf_path=/path/to/llama --prompt='Once' --prompt='The' \
      --max_tokens=64 --temperature=0.8 --seed=1

Prints each prompt followed by its continuation (one block per prompt and sample).
Compiles only the shapes it uses (no warm-up of the server's buckets).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", common.config_path("serve", "default"), "serving config", lock_config=True
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "a training run folder (or its checkpoints/)")
_HF_PATH = flags.DEFINE_string("hf_path", "", "a Hugging Face Llama/Mixtral folder")
_PROMPTS = flags.DEFINE_multi_string("prompt", ["def "], "prompt text (repeatable)")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "tokens to generate per sample")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling (1: off)")
_TOP_K = flags.DEFINE_integer("top_k", 0, "top-k sampling (0: off)")
_N = flags.DEFINE_integer("n", 1, "samples per prompt")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_STOP = flags.DEFINE_multi_string("stop", [], "stop string (repeatable); the text ends before it")


def generate_text(model, tokenizer, prompts, sampling, stops=(), serve_overrides=None):
    """Continuations (per prompt, per sample) of text prompts, cut at the first stop string."""
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.serve.engine import Engine
    from mlx_sched.server import text

    ids = [tokenizer.encode(p) for p in prompts]
    longest = max(map(len, ids)) + sampling.max_tokens
    page = 16
    pages = sampling.n * len(ids) * (-(-longest // page) + 1) + 2
    serve = ServeConfig(
        page_size=page,
        num_pages=max(64, pages),
        max_seqs=max(16, sampling.n * len(ids)),
        eos_token=tokenizer.eos_id if tokenizer.eos_id is not None else -1,
        **(serve_overrides or {}),
    )
    engine = Engine(model, serve, warmup=False)
    outs = engine.generate(ids, sampling)
    result = []
    for out in outs:
        texts = []
        for seq in out.outputs:
            cut = text.StopStrings(list(stops)) if stops else None
            t = tokenizer.decode(seq)
            if cut is not None:
                emitted, stopped = cut.push(t)
                t = emitted if stopped else emitted + cut.flush()
            texts.append(t)
        result.append(texts)
    return result


def main(argv):
    del argv
    from experiments import serving
    from mlx_sched.serve.request import SamplingParams

    config = _CONFIG.value
    model, tokenizer, name = serving.load_text_model(config, _CHECKPOINT.value, _HF_PATH.value)
    if tokenizer is None:
        raise common.ConfigError(
            f"{name} has no tokenizer.json: text generation needs one (serve it with "
            "experiments.serve and send token ids instead)"
        )
    sampling = SamplingParams(
        max_tokens=_MAX_TOKENS.value,
        temperature=_TEMPERATURE.value,
        top_p=_TOP_P.value,
        top_k=_TOP_K.value,
        n=_N.value,
        seed=_SEED.value,
    )
    texts = generate_text(model, tokenizer, _PROMPTS.value, sampling, _STOP.value)
    for prompt, samples in zip(_PROMPTS.value, texts, strict=True):
        for i, t in enumerate(samples):
            head = f"== {name}" + (f", sample {i + 1}/{len(samples)}" if len(samples) > 1 else "")
            print(f"{head}\n{prompt}{t}")


if __name__ == "__main__":
    common.run(main)
