"""Whole models from disk, for serving or as the frozen base of a LoRA adapter's training:
a Hugging Face folder (Llama or Mixtral, `models.hf`) or a training run of this framework
(its newest checkpoint and the model config in its metadata)."""

from __future__ import annotations

import dataclasses
import logging
import pathlib

from flax import nnx

from mlx_sched.train.checkpoint import CheckpointError, open_existing
from models import ModelConfig, Transformer
from models.errors import ConfigError


def load_weights(path, dtype: str) -> Transformer:
    """A model from a Hugging Face folder (it has a config.json; loaded in `dtype`) or from
    this framework's training checkpoint (its own config)."""
    if (pathlib.Path(path) / "config.json").is_file():
        from models import hf

        return hf.load_model(path, dtype=dtype)
    return load_checkpoint(path)


def load_checkpoint(path) -> Transformer:
    """The newest step of a training run's checkpoints (the run folder or its checkpoints/)."""
    path = pathlib.Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    ckpt, step = open_existing(path)
    meta = ckpt.read_meta(step)
    if "model" not in meta:
        raise CheckpointError(f"checkpoint {path}/{step} has no model config in its metadata")
    cfg = ModelConfig.from_dict(meta["model"])
    if cfg.lora is not None:
        raise CheckpointError(
            f"checkpoint {path}/{step} holds a LoRA adapter alone (model.lora is set), not a "
            "whole model: build it over its base with Trainer(..., base=...).model(params)"
        )
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    graphdef, like = nnx.split(abstract, nnx.Param)
    params, _, _ = ckpt.restore(step, like)
    ckpt.close()
    logging.info("loaded %s step %d", path, step)
    return nnx.merge(graphdef, params)


def with_base(model_cfg: ModelConfig, path: str) -> tuple[ModelConfig, nnx.State | None]:
    """`train.base`: (the model to train, its frozen base's parameters). With a path (a
    training run or a Hugging Face folder, loaded in model.dtype) the model is the base's
    with `model_cfg.lora` as its adapter; other model settings that differ from the base's
    are logged and not used. A ConfigError (one line) without model.lora. No path:
    (`model_cfg`, None), the base train.seed initialises."""
    if not path:
        return model_cfg, None
    if model_cfg.lora is None:
        raise ConfigError(
            f"train.base={path!r} is the frozen base of a LoRA adapter: set model.lora too "
            "(or leave train.base empty)"
        )
    base = load_weights(path, model_cfg.dtype)
    cfg = dataclasses.replace(base.cfg, lora=model_cfg.lora)
    differ = [
        f"{f.name}={getattr(model_cfg, f.name)!r} (base: {getattr(cfg, f.name)!r})"
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != getattr(model_cfg, f.name)
    ]
    if differ:
        logging.warning("train.base=%s sets the model; not used: model.%s", path, ", ".join(differ))
    return cfg, nnx.state(base, nnx.Param)
