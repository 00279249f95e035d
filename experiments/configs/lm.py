"""Dense language model trained on the embedded corpus (stdlib sources, byte-level).

Variants:
  default   ~3.2M params, 300 steps of 16 x 256 tokens (a few minutes on 2 CPU cores)
  runlocal  a tiny model for smoke tests (seconds)
  bf16      default in bfloat16 compute (float32 accumulation)

train.warmup_steps follows train.steps (10%) unless set, so `--config.train.steps=N` alone
is enough; `--config.model.moe=None` (or a dict of MoEConfig fields) switches MoE layers, and
`--config.model.lora="{'rank': 8, 'alpha': 16, 'targets': ('q_proj', 'v_proj')}"` trains only a
LoRA adapter on a frozen base (the one train.seed initialises; `Trainer(base=...)` takes another).

Run:
  python -m experiments.train --config=experiments/configs/lm.py:runlocal --workdir=/tmp/lm
  python -m experiments.train --config=experiments/configs/lm.py --workdir=/tmp/lm \
      --config.mesh.data=2 --config.mesh.tensor=4   # with 8 (forced) devices
"""

import ml_collections
from ml_collections import config_dict


def optional(section: dict | None = None) -> config_dict.FieldReference:
    """A config field holding a section or None, so `--config.model.moe=None` turns it off
    (and a dict literal turns it on); a plain ConfigDict field accepts neither."""
    value = None if section is None else ml_collections.ConfigDict(section)
    return config_dict.FieldReference(value, field_type=object)


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # warm-up follows the step count (10%) unless set itself, so lowering train.steps alone works
    steps = config_dict.FieldReference(300)
    c.model = dict(
        vocab_size=264,
        d_model=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        head_dim=0,
        d_ff=768,
        max_seq_len=1024,
        rope_theta=10000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        dtype="float32",
        param_dtype="float32",
        init_std=0.02,
        attention=dict(pattern="dense", stride=128, summary=8, heads="interleave"),
        moe=optional(None),
        lora=optional(None),
    )
    c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
    c.data = dict(path="", heldout_fraction=0.02)
    c.train = dict(
        steps=steps,
        batch_size=16,
        seq_len=256,
        lr=3e-3,
        warmup_steps=steps // 10,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        grad_clip=1.0,
        log_every=10,
        eval_every=100,
        eval_batches=4,
        ckpt_every=100,
        keep=3,
        seed=0,
        base="",  # with model.lora: the frozen base (a Hugging Face folder or a training run)
    )
    c.sample = dict(prompts=("def ", "import ", "class "), max_tokens=160, temperature=0.7, seed=0)
    c.kind = "train"
    c = ml_collections.ConfigDict(c)

    if arg == "runlocal":
        c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192)
        c.train.update(
            steps=20,
            batch_size=8,
            seq_len=64,
            log_every=5,
            eval_every=10,
            eval_batches=2,
            ckpt_every=10,
        )
        c.sample.max_tokens = 40
    elif arg == "bf16":
        c.model.dtype = "bfloat16"
    elif arg != "default":
        raise ValueError(f"unknown variant '{arg}' of lm.py; choose default, runlocal or bf16")
    return c


def get_sweep(arg: str = "default") -> list[dict]:
    """Learning-rate sweep (an example of the sweep format)."""
    del arg
    return [{"name": f"lr{lr:g}", "train.lr": lr} for lr in (1e-3, 3e-3, 1e-2)]
