"""Serving benchmarks: a model, an engine configuration and a synthetic workload.

Variants:
  default   1,000 ShareGPT-like requests (lengths scaled to the model), offline, 3.2M model
  online    the same at a Poisson rate (--config.workload.rate=...)
  decode    decode-heavy: 64 requests of 32 prompt -> 256 output tokens (slice-length study)
  decode_small  the same on a 0.4M-parameter model (d_model 128, 2 layers), where the
            per-call overhead that slices amortise is a larger share of an iteration
  llama44m  the model and default preset of the vLLM comparison (experiments/llama44m.py:
            random 44M Llama, d 512, 8 layers, vocab 32k), 32 x 128 -> 128
  runlocal  a tiny model and a short trace, for tests

The `server` section is read by `python -m experiments.serve` (the HTTP server);
the benchmarks ignore it.

  python -m experiments.bench_serving --config=experiments/configs/serve.py:decode --slice_lens=1,8
  python -m experiments.bench_serving --config=experiments/configs/serve.py:online \
      --config.serve.policy=vtc "--config.serve.policy_args={'weights': {'default': 2.0}}"
"""

import ml_collections

from experiments.configs import lm


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "serve"
    c.model = lm.get_config("default").model.to_dict()
    c.model.max_seq_len = 1024
    c.checkpoint = ""  # a training run folder (or its checkpoints/) to load weights from
    c.hf_path = ""  # or a Hugging Face Llama/Mixtral folder
    c.mesh = dict(data=1, fsdp=1, expert=1, tensor=1)
    c.serve = dict(
        page_size=16,
        num_pages=2048,
        max_seqs=64,
        token_budget=512,
        max_prefill_rows=4,
        prefill_chunk=0,
        slice_len=8,
        preemption="recompute",
        prefix_caching=True,
        policy="fcfs",
        policy_args={},  # the policy's settings: --config.serve.policy_args="{'key': value}"
        attn_chunk_pages=8,
        max_context=0,
        decode_widths=(1,),  # with speculation: (1, gamma + 1)
        # speculative decoding, e.g. "{'kind': 'prompt_lookup', 'gamma': 4}" or
        # "{'kind': 'draft_model', 'gamma': 4, 'draft_checkpoint': PATH}"
        speculative={},
    )
    c.workload = dict(
        num_requests=1000,
        online=False,
        rate=4.0,
        cv=1.0,
        preset="sharegpt",
        length_scale=0.25,
        seed=0,
        time_scale=1.0,
    )
    c.server = dict(
        host="127.0.0.1",
        port=8000,
        model_name="",  # "": the checkpoint's folder name, or "random-<variant>"
        max_n=8,  # most samples per prompt (n)
        max_waiting=256,  # requests not yet admitted before answering 503 + Retry-After
        max_body_bytes=1 << 20,
        shutdown_timeout_s=30.0,
        history=1000,  # finished requests and steps the engine keeps (a server never grows)
    )
    c = ml_collections.ConfigDict(c)
    if arg == "online":
        c.workload.update(online=True, num_requests=300, rate=8.0)
    elif arg in ("decode", "decode_small"):
        c.workload.update(num_requests=64, preset="decode_heavy", length_scale=1.0)
        if arg == "decode_small":
            c.model.update(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384)
    elif arg == "llama44m":
        from experiments.llama44m import MODEL, preset_fields

        c.model.update(**MODEL)
        c.serve.update(**preset_fields("default", "float32"))
        c.workload.update(num_requests=32, preset="fixed", length_scale=1.0)
    elif arg == "runlocal":
        c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256)
        c.serve.update(num_pages=256, max_seqs=16, token_budget=64, slice_len=4)
        c.workload.update(num_requests=24, length_scale=0.1)
    elif arg != "default":
        raise ValueError(f"unknown variant '{arg}' of serve.py")
    return c
