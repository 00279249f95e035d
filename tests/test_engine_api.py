"""Engine API: bad input never disturbs other requests, abort, streaming, callbacks, HF models."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import RequestError, SamplingParams, Status
from models import ConfigError, ModelConfig, Transformer
from models import generate as reference

CFG = ServeConfig(
    page_size=4, num_pages=64, max_seqs=4, token_budget=32, max_prefill_rows=2, slice_len=2
)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(
        vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64
    )
    return Transformer(cfg, nnx.Rngs(1))


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, CFG)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, 256, int(rng.integers(2, 20))))) for _ in range(n)]


@pytest.mark.parametrize(
    "prompt, sampling, message",
    [
        ([], SamplingParams(), "empty prompt"),
        ([1] * 60, SamplingParams(max_tokens=10), "exceeds the context length 64"),
        ([1, 300, 2], SamplingParams(), "outside the vocabulary"),
        ([1, -1], SamplingParams(), "outside the vocabulary"),
        (["a"], SamplingParams(), "sequence of token ids"),
        ([1, 2], SamplingParams(max_tokens=8, stop_tokens=(999,)), "stop tokens outside"),
        ([1, 2], SamplingParams(max_tokens=8, n=5), "exceeds serve.max_seqs"),
        ([1, 2], SamplingParams(max_tokens=8, stop_tokens=range(7)), "at most 6 stop tokens"),
    ],
)
def test_bad_requests_are_rejected_and_leave_state_intact(engine, prompt, sampling, message):
    before = (len(engine.requests), engine.pool.num_available, len(engine.sched.waiting))
    with pytest.raises(RequestError, match=message):
        engine.add_request(prompt, sampling)
    assert (len(engine.requests), engine.pool.num_available, len(engine.sched.waiting)) == before


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("123", "tokenize text first"),  # not [1, 2, 3]
        ([1.5, 2.0], "got 1.5 .float"),  # not [1, 2]
        (np.array([3.7, 4.2]), "integer array"),  # not [3, 4]
        (np.array([[1, 2]]), "1-D"),
        ([1, True], "got True"),
        (7, "sequence of token ids"),
    ],
)
def test_prompts_must_be_integer_token_ids(engine, prompt, message):
    with pytest.raises(RequestError, match=message):
        engine.add_request(prompt, SamplingParams())


def test_integer_numpy_prompts_and_values_are_accepted(engine):
    sp = SamplingParams(max_tokens=np.int64(2), temperature=np.float32(0.5), seed=np.int32(3))
    assert isinstance(sp.max_tokens, int) and isinstance(sp.temperature, float)
    rid = engine.add_request(np.array([3, 4, 5], np.int32), sp)
    assert engine.requests[rid].prompt == [3, 4, 5]
    engine.abort(rid)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n must be"),
        (dict(seed=-1), "seed"),
        (dict(temperature="0.5"), "temperature .*str"),  # refused, not coerced
        (dict(top_p=None), "top_p .*NoneType"),
        (dict(max_tokens=2.0), "max_tokens .*float"),
        (dict(n=True), "n must be an int"),
        (dict(stop_tokens="ab"), "stop_tokens"),
        (dict(stop_tokens=(1.5,)), "stop_tokens"),
        (dict(ignore_eos=1), "ignore_eos"),
        (dict(stop_tokens=(True,)), "stop_tokens"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(seed=2**31), "seed"),
    ],
)
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(temperature=0.7, top_k=5, top_p=0.9, stop_tokens=(3, 4), n=2, seed=7, logprobs=True),
        dict(temperature=1, max_tokens=np.int64(5), stop_tokens=[np.int32(3)], seed=np.int32(2)),
    ],
)
def test_valid_sampling_params_are_normalised_on_both_paths(kwargs):
    """Plain values take a fast path, others are converted: the same params either way."""
    sp = SamplingParams(**kwargs)
    for name in ("max_tokens", "top_k", "n", "seed"):
        assert type(getattr(sp, name)) is int
    assert type(sp.temperature) is float and type(sp.top_p) is float
    assert type(sp.stop_tokens) is tuple and all(type(t) is int for t in sp.stop_tokens)
    assert sp._plain()  # what the conversions leave is plain
    again = dataclasses.replace(sp, seed=sp.seed + 1)
    assert dataclasses.replace(again, seed=sp.seed) == sp


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(token_budget=8, page_size=16), "token_budget .* must be >= page_size"),
        (dict(num_pages=1), "num_pages"),
        (dict(preemption="drop"), "preemption"),
        (dict(decode_buckets=(4, 8), max_seqs=16), "must end at max_seqs"),
        (dict(policy="nope"), "unknown policy 'nope'"),
    ],
)
def test_bad_serve_config_is_a_config_error(model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Engine(model, ServeConfig(**kwargs), warmup=False)


def test_request_larger_than_the_pool_is_rejected(model):
    small = Engine(
        model, ServeConfig(page_size=4, num_pages=6, max_seqs=4, token_budget=16), warmup=False
    )
    with pytest.raises(RequestError, match="KV pages but the pool has 5"):
        small.add_request([1] * 10, SamplingParams(max_tokens=20))


def test_more_requests_than_fit_wait_their_turn_and_match_reference(engine, model):
    prompts = _prompts(11)
    outs = engine.generate(prompts, SamplingParams(max_tokens=6))
    ref = reference.generate(model, prompts, 6)
    assert [o.outputs[0] for o in outs] == ref
    assert max(r.running for r in engine.step_records) <= CFG.max_seqs
    engine.pool.check()
    assert engine.pool.num_in_use == 0


def test_abort_frees_pages_and_spares_the_others(engine, model):
    prompts = _prompts(3, seed=1)
    ids = [engine.add_request(p, SamplingParams(max_tokens=10)) for p in prompts]
    for _ in range(3):
        engine.step()
    engine.abort(ids[1])
    assert engine.requests[ids[1]].status is Status.ABORTED
    while engine.has_work():
        engine.step()
    ref = reference.generate(model, prompts, 10)
    assert engine.requests[ids[0]].outputs()[0] == ref[0]
    assert engine.requests[ids[2]].outputs()[0] == ref[2]
    engine.pool.check()
    assert engine.pool.num_in_use == 0
    with pytest.raises(RequestError, match="already aborted"):
        engine.abort(ids[1])
    with pytest.raises(RequestError, match="already finished"):
        engine.abort(ids[0])
    with pytest.raises(RequestError, match="unknown request id"):
        engine.abort("nope")
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request([1, 2], request_id=ids[0])


def test_streaming_and_callbacks_deliver_every_token(engine):
    prompt = _prompts(1, seed=2)[0]
    seen = []
    rid = engine.add_request(prompt, SamplingParams(max_tokens=9), on_output=seen.append)
    other = engine.add_request(_prompts(1, seed=3)[0], SamplingParams(max_tokens=4))
    streamed = [t for chunk in engine.stream(rid) for t in chunk[0]]
    final = engine.requests[rid].outputs()[0]
    assert streamed == final and len(final) == 9
    assert [t for o in seen for t in o.new_tokens[0]] == final
    assert seen[-1].finished and seen[-1].finish_reasons == ["length"]
    while engine.has_work():
        engine.step()
    assert engine.requests[other].status is Status.FINISHED


def test_stop_tokens_end_a_sequence(engine, model):
    prompt = _prompts(1, seed=4)[0]
    free_run = reference.generate(model, [prompt], 12)[0]
    stop = free_run[4]
    (out,) = engine.generate([prompt], SamplingParams(max_tokens=12, stop_tokens=(stop,)))
    first = free_run.index(stop)
    assert out.outputs[0] == free_run[: first + 1]
    assert out.finish_reasons == ["stop"]


@pytest.mark.slow  # a Hugging Face checkpoint through the engine
def test_serves_a_hugging_face_llama(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models import hf

    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(cfg).eval()
    theirs.save_pretrained(tmp_path)
    prompts = _prompts(3, seed=5)
    eng = Engine(hf.load_model(tmp_path), CFG)
    outs = eng.generate(prompts, SamplingParams(max_tokens=8))
    for p, o in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ids = torch.tensor([p])
            g = theirs.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=299,
                eos_token_id=None,
            )
        assert o.outputs[0] == g[0, len(p) :].tolist()
