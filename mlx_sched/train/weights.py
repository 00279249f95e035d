"""Whole models from disk, for serving or as the frozen base of a LoRA adapter's training:
a Hugging Face folder (Llama or Mixtral, `models.hf`) or a training run of this framework
(its newest checkpoint and the model config in its metadata)."""

from __future__ import annotations

import logging
import pathlib

from flax import nnx

from mlx_sched.train.checkpoint import CheckpointError, open_existing
from models import ModelConfig, Transformer


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
