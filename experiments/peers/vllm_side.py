"""vLLM's side of experiments.bench_llama, run by the python of a side environment with vllm
installed (never this project's): it imports only vllm, numpy and the standard library.

  <vllm-venv>/bin/python experiments/peers/vllm_side.py --model DIR --trace FILE.json \
      --mode offline|online --dtype float32|bfloat16 --runs 3

A trace is a JSON list of {"arrival_s", "prompt_ids", "max_new_tokens"}. Greedy, EOS ignored,
every output forced to its length. Offline: all requests at t = 0, timed `--runs` times after a
warm-up. Online: each request is added at its arrival time. Prints one line `RESULT {json}`
with output tokens (generated only) and total tokens (prompt + output) per second.
"""

import argparse
import json
import time

import numpy as np


def percentile(values, q):
    return float(np.percentile(np.asarray(values, np.float64), q))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--mode", default="offline", choices=["offline", "online"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max_num_batched_tokens", type=int, default=2048)
    ap.add_argument("--max_num_seqs", type=int, default=64)
    ap.add_argument("--block", type=int, default=128)
    a = ap.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(a.trace) as f:
        trace = json.load(f)
    t = time.perf_counter()
    llm = LLM(
        model=a.model,
        skip_tokenizer_init=True,
        dtype=a.dtype,
        max_model_len=1024,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        enable_chunked_prefill=True,
        block_size=a.block,
        enable_prefix_caching=False,
        seed=0,
    )
    init_s = time.perf_counter() - t

    def sp(n):
        return SamplingParams(
            max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False
        )

    prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in trace]
    llm.generate(prompts[:2], [sp(8)] * 2, use_tqdm=False)  # warm-up
    prompt_tokens = sum(len(r["prompt_ids"]) for r in trace)
    out_tokens = sum(r["max_new_tokens"] for r in trace)
    res = {"engine": "vllm-cpu", "dtype": a.dtype, "mode": a.mode, "init_s": init_s}
    if a.mode == "offline":
        walls = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, [sp(r["max_new_tokens"]) for r in trace], use_tqdm=False)
            walls.append(time.perf_counter() - t0)
            assert sum(len(o.outputs[0].token_ids) for o in outs) == out_tokens
        best, med = min(walls), float(np.median(walls))
        res.update(
            walls=walls,
            output_tok_s_best=out_tokens / best,
            output_tok_s_median=out_tokens / med,
            total_tok_s_best=(prompt_tokens + out_tokens) / best,
            total_tok_s_median=(prompt_tokens + out_tokens) / med,
        )
    else:
        eng = llm.llm_engine
        sub, first, last, ntoks, done = {}, {}, {}, {}, set()
        t0, i = time.perf_counter(), 0
        while len(done) < len(trace):
            now = time.perf_counter() - t0
            while i < len(trace) and trace[i]["arrival_s"] <= now:
                r = trace[i]
                eng.add_request(str(i), prompts[i], sp(r["max_new_tokens"]))
                sub[str(i)] = time.perf_counter()
                i += 1
            if not eng.has_unfinished_requests():
                time.sleep(0.001)
                continue
            for o in eng.step():
                tt, n = time.perf_counter(), len(o.outputs[0].token_ids)
                if n and o.request_id not in first:
                    first[o.request_id] = tt
                last[o.request_id], ntoks[o.request_id] = tt, n
                if o.finished:
                    done.add(o.request_id)
        wall = time.perf_counter() - t0
        ttft = [first[k] - sub[k] for k in sub]
        tpot = [(last[k] - first[k]) / max(1, ntoks[k] - 1) for k in sub]
        res.update(
            wall_s=wall,
            output_tok_s=sum(ntoks.values()) / wall,
            total_tok_s=(prompt_tokens + sum(ntoks.values())) / wall,
            ttft_p50_ms=1e3 * percentile(ttft, 50),
            ttft_p90_ms=1e3 * percentile(ttft, 90),
            tpot_p50_ms=1e3 * percentile(tpot, 50),
            tpot_p90_ms=1e3 * percentile(tpot, 90),
        )
    print("RESULT", json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
