"""LoRA adapters: a model without one is unchanged, parity with peft both ways (Llama), the
router's adapter by hand (Mixtral-style MoE), merging, frozen-base training, serving, and the
config and adapter-file errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import ConfigError, ModelConfig, Transformer, lora, lora_peft

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIXTRAL_MOE = dict(num_experts=4, top_k=2, gates="topk_softmax", every=1, offset=0)


def _randomise_b(model, seed=0, std=0.05):
    """Non-zero B for every adapter (a fresh adapter's B is zero and changes nothing)."""
    for i, (_, _, _, ad) in enumerate(lora.adapters(model)):
        key = jax.random.fold_in(jax.random.key(seed), i)
        ad.b[...] = (std * jax.random.normal(key, ad.b.shape)).astype(ad.b.dtype)
    return model


def _tokens(vocab=256, shape=(2, 24), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


@nnx.jit(static_argnames="mode")
def _logits(model, tokens, mode="serve"):
    return model(jnp.asarray(tokens), mode=mode)


def _with_lora(cfg, **lcfg):
    return dataclasses.replace(cfg, lora=dict(rank=4, alpha=8.0, **lcfg))


# -- the model ----------------------------------------------------------------


def test_a_model_without_adapter_is_unchanged_and_a_fresh_one_changes_nothing(tiny_cfg):
    base = Transformer(tiny_cfg, nnx.Rngs(0))
    adapted = Transformer(_with_lora(tiny_cfg, targets=ALL), nnx.Rngs(0))
    assert not jax.tree.leaves(nnx.state(base, lora.LoraParam))
    assert all(m.lora is None for b in base.layers for m in (b.attn, b.mlp))
    # adapters are built after every base weight: one seed, one base
    base_of = nnx.state(adapted, nnx.All(nnx.Param, nnx.Not(lora.LoraParam)))
    same = jax.tree.map(np.array_equal, nnx.state(base, nnx.Param), base_of)
    assert all(jax.tree.leaves(same))
    tokens = _tokens()
    np.testing.assert_array_equal(_logits(adapted, tokens), _logits(base, tokens))
    # no extra compute without adapters: each adapter adds exactly its two matmuls
    dots = lambda m: str(jax.make_jaxpr(lambda t: m(t))(jnp.asarray(tokens))).count("dot_general")
    n_adapters = len(list(lora.adapters(adapted)))
    assert n_adapters == len(ALL) * tiny_cfg.n_layers
    assert dots(adapted) == dots(base) + 2 * n_adapters


def test_adapters_are_initialised_as_peft_and_carry_axes(tiny_cfg):
    model = Transformer(_with_lora(tiny_cfg, targets=("q_proj", "o_proj")), nnx.Rngs(0))
    q, o = (model.layers[0].attn.lora[t] for t in ("q_proj", "o_proj"))
    D, H, X = tiny_cfg.d_model, tiny_cfg.n_heads, tiny_cfg.head_dim
    assert q.a.shape == (D, 4) and q.b.shape == (4, H, X) and q.scale == 2.0
    assert o.a.shape == (H, X, 4) and o.b.shape == (4, D)
    for ad, fan_in in [(q, D), (o, H * X)]:  # kaiming-uniform A, zero B
        a = np.asarray(ad.a[...])
        assert np.abs(a).max() <= 1 / np.sqrt(fan_in) and a.std() > 0.25 / np.sqrt(fan_in)
        assert not np.asarray(ad.b[...]).any()
        assert isinstance(ad.a, lora.LoraParam) and isinstance(ad.a, nnx.Param)
    assert q.a.get_metadata()["axes"] == ("embed", None)
    assert q.b.get_metadata()["axes"] == (None, "heads", "head_dim")


def test_merged_adapter_equals_unmerged(tiny_cfg):
    model = _randomise_b(Transformer(_with_lora(tiny_cfg, targets=ALL), nnx.Rngs(0)))
    merged = lora.merge(model)
    assert merged.cfg == tiny_cfg and not jax.tree.leaves(nnx.state(merged, lora.LoraParam))
    assert nnx.graphdef(merged) == nnx.graphdef(Transformer(tiny_cfg, nnx.Rngs(0)))
    tokens = _tokens()
    out = np.asarray(_logits(model, tokens))
    np.testing.assert_allclose(np.asarray(_logits(merged, tokens)), out, atol=1e-5)
    base = lora.base_model(model)
    assert np.abs(np.asarray(_logits(base, tokens)) - out).max() > 1e-2  # the adapter mattered
    np.testing.assert_array_equal(base.embed[...], model.embed[...])


def test_router_adapter_equals_a_hand_merged_router(tiny_cfg):
    """Mixtral-style MoE: the router's adapter is W_router + alpha / r * A @ B, by numpy."""
    cfg = dataclasses.replace(tiny_cfg, moe=MIXTRAL_MOE, init_std=0.1)
    model = Transformer(_with_lora(cfg, targets=("router", "q_proj")), nnx.Rngs(0))
    _randomise_b(model, std=0.5)
    hand = Transformer(cfg, nnx.Rngs(0))
    for block, mine in zip(hand.layers, model.layers, strict=True):
        ad = mine.mlp.lora["router"]
        assert ad.a.shape == (cfg.d_model, 4) and ad.b.shape == (4, 4)
        a, b = np.asarray(ad.a[...], np.float64), np.asarray(ad.b[...], np.float64)
        router = np.asarray(block.mlp.router[...], np.float64) + 2.0 * a @ b
        block.mlp.router[...] = jnp.asarray(router, jnp.float32)
        q = mine.attn.lora["q_proj"]
        wq = np.einsum("di,ihx->dhx", np.asarray(q.a[...]), np.asarray(q.b[...]))
        block.attn.wq[...] = block.attn.wq[...] + 2.0 * wq
    tokens = _tokens()
    base = Transformer(cfg, nnx.Rngs(0))
    for mode in ("serve", "train"):  # dropless, and capacity-limited routing
        out = np.asarray(_logits(model, tokens, mode))
        np.testing.assert_allclose(np.asarray(_logits(hand, tokens, mode)), out, atol=1e-5)
        assert np.abs(np.asarray(_logits(base, tokens, mode)) - out).max() > 1e-2


def test_router_adapter_round_trips_through_the_peft_layout(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, moe=MIXTRAL_MOE)
    model = _randomise_b(Transformer(_with_lora(cfg, targets=("router", "o_proj")), nnx.Rngs(0)))
    lora_peft.save_adapter(model, tmp_path, base_model_name_or_path="tiny-mixtral")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["gate", "o_proj"]
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    tensors = lora_peft.adapter_tensors(model)
    name = "base_model.model.model.layers.1.block_sparse_moe.gate.lora_"
    assert tensors[name + "A.weight"].shape == (4, cfg.d_model)
    assert tensors[name + "B.weight"].shape == (4, 4)  # [experts, r]
    again = lora_peft.load_adapter(lora.base_model(model), tmp_path)
    assert again.cfg == model.cfg
    tokens = _tokens()
    np.testing.assert_array_equal(_logits(again, tokens), _logits(model, tokens))


# -- parity with peft ---------------------------------------------------------


def _hf_base_and_ours(tmp_path, tiny_cfg, tie):
    transformers = pytest.importorskip("transformers")
    cfg = dataclasses.replace(tiny_cfg, tie_embeddings=tie, norm_eps=1e-6)
    base = Transformer(cfg, nnx.Rngs(3))
    from models import hf

    hf.save_llama(base, tmp_path / "base")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    return base, theirs


def _torch_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("tie, targets", [(False, ALL), (True, ("q_proj", "v_proj"))])
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, tiny_cfg, tie, targets):
    peft = pytest.importorskip("peft")
    base, theirs = _hf_base_and_ours(tmp_path, tiny_cfg, tie)
    ours = _randomise_b(lora.add_adapter(base, dict(rank=4, alpha=8.0, targets=targets), seed=1))
    lora_peft.save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="base")
    peft_model = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    tokens = _tokens()
    ref = _torch_logits(peft_model, tokens)
    np.testing.assert_allclose(np.asarray(_logits(ours, tokens)), ref, atol=1e-4)
    assert np.abs(np.asarray(_logits(base, tokens)) - ref).max() > 1e-2  # the adapter mattered


def test_a_peft_adapter_loads_into_ours_with_the_same_logits(tmp_path, tiny_cfg):
    peft = pytest.importorskip("peft")
    import torch

    base, theirs = _hf_base_and_ours(tmp_path, tiny_cfg, tie=False)
    targets = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=6, lora_alpha=12, target_modules=targets, lora_dropout=0.1)
    peft_model = peft.get_peft_model(theirs, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = lora_peft.load_adapter(base, tmp_path / "adapter")
    assert ours.cfg.lora == lora.LoraConfig(rank=6, alpha=12, targets=targets[::-1])
    tokens = _tokens()
    ref = _torch_logits(peft_model.eval(), tokens)
    np.testing.assert_allclose(np.asarray(_logits(ours, tokens)), ref, atol=1e-4)


# -- training and serving -----------------------------------------------------


@pytest.mark.slow  # 20 training steps
def test_an_adapter_learns_on_the_corpus_over_the_seeds_frozen_base(tmp_path):
    from experiments.configs import lm
    from mlx_sched.train import loop, plots

    c = lm.get_config("runlocal")
    # a random base of larger weights (its logits can be shaped); targets: every projection
    c.model.update(init_std=0.1, lora=dict(rank=8, alpha=16.0, targets=ALL))
    c.train.update(lr=1e-2, weight_decay=0.0)
    trainer, params, eval_loss = loop.train_from_config(c, tmp_path)
    variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert variables and all(isinstance(v, lora.LoraParam) for v in variables)
    # the frozen base is the one train.seed gives a model without adapter, bit for bit
    cfg = dataclasses.replace(trainer.model_cfg, lora=None)
    fresh = nnx.state(Transformer(cfg, nnx.Rngs(c.train.seed)), nnx.Param)
    equal = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))
    assert all(jax.tree.leaves(jax.tree.map(equal, fresh, *trainer.frozen)))
    base_loss = trainer.evaluate(jax.tree.map(jnp.zeros_like, params))  # a zero adapter
    assert eval_loss < base_loss - 0.5  # held-out
    train = [r for r in plots.read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.2


def test_trainer_takes_a_given_frozen_base_and_refuses_a_wrong_one(tmp_path, tiny_cfg):
    import sharding
    from mlx_sched.train import data, loop

    cfg = _with_lora(tiny_cfg, targets=("q_proj",))
    tc = loop.TrainConfig(steps=2, batch_size=8, seq_len=16, warmup_steps=0)
    mesh = sharding.make_mesh()
    corpus = data.load_corpus(None, 0.05)
    base = nnx.state(Transformer(tiny_cfg, nnx.Rngs(7)), nnx.Param)
    trainer = loop.Trainer(cfg, tc, mesh, tmp_path / "a", corpus=corpus, base=base)
    before = jax.tree.map(np.asarray, base)
    params, _ = trainer.run()
    same = jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), before, *trainer.frozen)
    assert all(jax.tree.leaves(same))
    variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert variables and all(isinstance(v, lora.LoraParam) for v in variables)
    assert np.asarray(params["layers"][0]["attn"]["lora"]["q_proj"]["b"][...]).any()
    # optimizer state (restored from the checkpoint) only for the adapter: Adam's mu and nu
    _, opt_state, step = trainer.init_or_restore()
    assert step == tc.steps
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0]
    assert sum(sizes) == 2 * trainer.num_trainable == 2 * 2 * (64 * 4 + 4 * 64)
    wrong = nnx.state(Transformer(dataclasses.replace(tiny_cfg, d_ff=64), nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ConfigError, match="frozen base does not fit"):
        loop.Trainer(cfg, tc, mesh, tmp_path / "b", corpus=corpus, base=wrong)


def test_train_base_trains_an_adapter_over_a_model_on_disk(tmp_path, tiny_cfg, caplog):
    """`train.base` names the frozen base from the command line: a Hugging Face folder (or a
    training run); the model is the base's with the config's adapter, bit for bit its
    weights, and settings of the model section that differ are logged, not used."""
    import logging

    from mlx_sched.train import loop
    from models import hf_export

    base = Transformer(tiny_cfg, nnx.Rngs(5))
    hf_export.save_llama(base, tmp_path / "hf")
    config = {
        "model": dataclasses.asdict(tiny_cfg) | {
            "d_ff": 96, "lora": dict(rank=4, alpha=8.0, targets=("q_proj", "down_proj")),
        },
        "train": dict(steps=2, batch_size=8, seq_len=16, warmup_steps=0, eval_every=2,
                      ckpt_every=2, eval_batches=1, base=str(tmp_path / "hf")),
    }  # fmt: skip
    with caplog.at_level(logging.WARNING):
        trainer, params, _ = loop.train_from_config(config, tmp_path / "run")
    assert "not used: model." in caplog.text and "d_ff=96 (base: 128)" in caplog.text
    assert trainer.model_cfg.d_ff == 128 and trainer.model_cfg.lora.rank == 4
    want = nnx.state(base, nnx.Param)
    same = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), want, *trainer.frozen
    )
    assert all(jax.tree.leaves(same))
    assert np.asarray(params["layers"][0]["attn"]["lora"]["q_proj"]["b"][...]).any()
    no_lora = {"model": dataclasses.asdict(tiny_cfg), "train": config["train"]}
    with pytest.raises(ConfigError, match="frozen base of a LoRA adapter: set model.lora"):
        loop.train_from_config(no_lora, tmp_path / "r2")
    with pytest.raises(ConfigError, match="train.base must be a path"):
        loop.TrainConfig(base=3)


def test_the_engine_serves_a_model_with_an_adapter():
    from tests_serve_common import SERVE

    from mlx_sched.serve.engine import Engine
    from mlx_sched.serve.request import SamplingParams
    from models import generate as reference

    cfg = ModelConfig(
        vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=96
    )
    model = _randomise_b(Transformer(_with_lora(cfg, targets=ALL), nnx.Rngs(0)), std=0.3)
    serve = dataclasses.replace(SERVE, num_pages=64)
    prompts = [list(map(int, p)) for p in _tokens(256, (3, 9), seed=2)]
    outs = [
        o.outputs[0] for o in Engine(model, serve).generate(prompts, SamplingParams(max_tokens=6))
    ]
    assert outs == reference.generate(model, prompts, 6)
    assert outs != reference.generate(lora.base_model(model), prompts, 6)


# -- errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "lcfg, message",
    [
        (dict(rank=0), r"model.lora.rank must be an integer > 0, got 0"),
        (dict(rank=2.5), r"model.lora.rank must be an integer > 0, got 2.5"),
        (dict(alpha=0), r"model.lora.alpha must be > 0"),
        (
            dict(targets=("q_prj",)),
            r"unknown model.lora target 'q_prj' \(did you mean 'q_proj'\?\)",
        ),
        (dict(targets=()), r"model.lora.targets must name at least one"),
        (dict(targets=("q_proj", "q_proj")), r"names a module twice"),
        (dict(dropout=0.1), r"model.lora.dropout must be 0"),
        (dict(ranks=4), r"unknown model.lora config key 'ranks' \(did you mean 'rank'\?\)"),
        (dict(targets=("router",)), r"target 'router' needs MoE layers"),
        ("abc", r"model.lora must be None or a dict of LoRA settings, got 'abc'"),
    ],
)
def test_bad_lora_configs_are_one_line_errors(tiny_cfg, lcfg, message):
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig.from_dict({**tiny_cfg.to_dict(), "lora": lcfg})
    assert "\n" not in str(e.value)


def test_targets_are_one_order_and_a_command_line_list_is_read():
    assert lora.LoraConfig(targets="v_proj, q_proj").targets == ("q_proj", "v_proj")
    assert lora.LoraConfig(targets=["router", "o_proj"]) == lora.LoraConfig(
        targets=("o_proj", "router")
    )
    assert lora.LoraConfig(rank=4, alpha=8).scale == 2.0


def test_mlp_targets_in_an_all_moe_model_and_exports_are_refused(tiny_cfg, tmp_path):
    from models import hf

    with pytest.raises(ConfigError, match=r"targets \['up_proj'\] are dense-MLP projections"):
        dataclasses.replace(tiny_cfg, moe=MIXTRAL_MOE, lora=dict(targets=("up_proj",)))
    model = Transformer(_with_lora(tiny_cfg, targets=("q_proj",)), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="has a LoRA adapter .* lora.merge"):
        hf.save_llama(model, tmp_path / "x")
    with pytest.raises(ValueError, match="already has an adapter"):
        lora.add_adapter(model, dict(targets=("v_proj",)))
    with pytest.raises(ConfigError, match="no adapter to save"):
        lora_peft.save_adapter(lora.base_model(model), tmp_path / "y")


def _edit_config(path, **change):
    f = path / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **change}))


def test_bad_adapter_folders_are_clear_errors(tiny_cfg, tmp_path):
    from safetensors.numpy import load_file, save_file

    model = _randomise_b(Transformer(_with_lora(tiny_cfg, targets=("q_proj",)), nnx.Rngs(0)))
    base = lora.base_model(model)
    Error = lora_peft.AdapterFormatError

    def refused(message, change=None, tensors=None):
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        lora_peft.save_adapter(model, d)
        if change:
            _edit_config(d, **change)
        if tensors is not None:
            save_file(
                tensors(load_file(str(d / "adapter_model.safetensors"))),
                str(d / "adapter_model.safetensors"),
            )
        with pytest.raises(Error, match=message):
            lora_peft.load_adapter(base, d)

    with pytest.raises(Error, match="has no adapter_config.json"):
        lora_peft.load_adapter(base, tmp_path)
    refused(r"peft_type 'PREFIX_TUNING' is not 'LORA'", {"peft_type": "PREFIX_TUNING"})
    refused(r"use_dora=True is not supported", {"use_dora": True})
    refused(r"bias='all' is not supported", {"bias": "all"})
    refused(r"target_modules must be a list .* 'all-linear'", {"target_modules": "all-linear"})
    refused(r"target_modules \['lm_head'\] are not supported", {"target_modules": ["lm_head"]})
    refused(r"model.lora.rank must be an integer > 0, got 0", {"r": 0})
    refused(
        r"does not fit the model: model.lora target 'router' needs MoE",
        {"target_modules": ["gate"]},
    )
    refused(
        r"adapter lacks tensor 'base_model.model.model.layers.0.self_attn.v_proj.lora_A",
        {"target_modules": ["q_proj", "v_proj"]},
    )
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    refused(
        r"'.*layers.1.self_attn.q_proj.lora_B.weight' has shape \(64, 8\), expected \(64, 4\)",
        tensors=lambda t: {**t, key: np.zeros((64, 8), np.float32)},
    )
    refused(
        r"has 1 tensors the model has no adapter for, e.g. 'extra'",
        tensors=lambda t: {**t, "extra": np.zeros(2, np.float32)},
    )
    d = tmp_path / "corrupt"
    lora_peft.save_adapter(model, d)
    (d / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Error, match="cannot read"):
        lora_peft.load_adapter(base, d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(Error, match="is not valid JSON"):
        lora_peft.load_adapter(base, d)
