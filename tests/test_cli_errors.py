"""Bad configs and new-user mistakes: each is one line on stderr naming the setting and what it
may be, exit status 2, no traceback. The checks themselves are tested in-process (fast); the
table at the end runs every case through its command line (slow: one JAX start-up each)."""

import fcntl
import os
import subprocess
import sys
import types

import pytest
from absl import flags
from ml_collections import config_flags

from experiments import common
from mlx_sched.train import loop
from mlx_sched.train.optim import TrainConfig, check_range
from models.config import ModelConfig
from models.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")


def _parse(spec: str, *overrides: str):
    """A config file as a command line would load it: `--config=spec --config.a.b=v ...`."""
    argv = ["prog", f"--config={os.path.join(CONFIGS, spec)}", *overrides]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", None, flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    return holder.value


# ---------------------------------------------------------------------------
# Training settings: every field names itself and its range
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("b2", 1.5, "train.b2 must be in [0, 1), got 1.5"),
        ("b1", -0.1, "train.b1 must be in [0, 1), got -0.1"),
        ("weight_decay", -1.0, "train.weight_decay must be >= 0, got -1.0"),
        ("min_lr_ratio", -1.0, "train.min_lr_ratio must be in [0, 1], got -1.0"),
        ("keep", 0, "train.keep must be > 0"),
        ("keep", -1, "train.keep must be > 0"),
        ("seed", -1, "train.seed must be >= 0, got -1"),
        ("eval_batches", 0, "train.eval_batches must be > 0"),
        ("steps", 0, "train.steps must be > 0, got 0"),
        ("lr", 0.0, "train.lr must be > 0, got 0.0"),
        ("grad_clip", -1.0, "train.grad_clip must be > 0, got -1.0"),
        ("warmup_steps", 300, "train.warmup_steps must be in [0, train.steps=300), got 300"),
    ],
)
def test_train_config_names_the_field_and_its_range(field, value, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value})
    assert message in str(e.value)


def test_check_range_names_the_section_the_field_and_the_bounds():
    cfg = types.SimpleNamespace(x=1.0)
    check_range(cfg, "x", 0.0, 1.0)  # bounds included by default
    check_range(cfg, "x", 1.0)  # no upper bound
    with pytest.raises(ConfigError, match=r"^tuner\.x must be in \(0, 1\), got 1.0$"):
        check_range(cfg, "x", 0.0, 1.0, lo_open=True, hi_open=True, section="tuner")
    with pytest.raises(ConfigError, match=r"^train\.x must be > 1 \(why\), got 1.0$"):
        check_range(cfg, "x", 1, lo_open=True, what="why")


def test_train_config_edges_are_accepted():
    TrainConfig(b1=0.0, b2=0.0, weight_decay=0.0, min_lr_ratio=1.0, keep=1, seed=0)
    TrainConfig(steps=1, warmup_steps=0, eval_batches=1)


def test_warmup_follows_train_steps_unless_set():
    from experiments.configs import lm, main, moe_routing

    for module, variant in ((lm, "runlocal"), (main, "default"), (moe_routing, "default")):
        c = module.get_config(variant)
        c.lock()
        c.train.steps = 1  # only the steps lowered, as --config.train.steps=1 does
        assert c.train.warmup_steps == 0
        TrainConfig.from_dict(c.train)
    c = lm.get_config("default")
    assert (c.train.steps, c.train.warmup_steps) == (300, 30)  # the documented default
    c.train.warmup_steps = 7
    c.train.steps = 50
    assert c.train.warmup_steps == 7  # set by hand: kept, and checked against the steps
    c.train.steps = 5
    with pytest.raises(ConfigError, match=r"train.warmup_steps must be in \[0, train.steps=5\)"):
        TrainConfig.from_dict(c.train)


# ---------------------------------------------------------------------------
# Model, batch and mesh must fit each other: checked before any compile
# ---------------------------------------------------------------------------

MESH = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}


@pytest.mark.parametrize(
    "mesh, train, message",
    [
        ({"data": 8}, {"batch_size": 4}, "train.batch_size must be a multiple of 8"),
        ({"data": 2, "fsdp": 2}, {"batch_size": 6}, "mesh.data=2 x mesh.fsdp=2), got 6"),
        ({"tensor": 8}, {}, "mesh.tensor must divide model.n_heads=4 and model.n_kv_heads=2"),
        ({"tensor": 4}, {}, "(one of [1, 2]), got 4"),
        ({}, {"seq_len": 256}, "train.seq_len must be <= model.max_seq_len=128, got 256"),
    ],
)
def test_model_batch_and_mesh_must_fit(tiny_cfg, mesh, train, message):
    tc = TrainConfig(**{"steps": 10, "warmup_steps": 1, "batch_size": 8, "seq_len": 64, **train})
    with pytest.raises(ConfigError) as e:
        loop.check_fits(tiny_cfg, tc, {**MESH, **mesh})
    assert message in str(e.value)


def test_fitting_meshes_pass(tiny_cfg):
    tc = TrainConfig(steps=10, warmup_steps=1, batch_size=8, seq_len=128)
    for mesh in ({"data": 8}, {"data": 4, "tensor": 2}, {"fsdp": 2, "expert": 2, "tensor": 2}):
        loop.check_fits(tiny_cfg, tc, {**MESH, **mesh})
    loop.check_fits(ModelConfig(vocab_size=264, n_heads=8, n_kv_heads=4), tc, {"tensor": 4})


# ---------------------------------------------------------------------------
# Workdirs: unwritable, and held by another run
# ---------------------------------------------------------------------------


def test_workdir_that_cannot_be_created_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--workdir=.*/file/run cannot be created"):
        common.require_workdir(str(tmp_path / "file" / "run"))


def test_workdir_lock_names_the_process_that_holds_it(tmp_path):
    other = os.open(tmp_path / common.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)  # a second open file: contends like another process
    os.write(other, b"4242\n")
    try:
        with pytest.raises(common.WorkdirBusy, match="in use by process 4242"):
            common.lock_workdir(tmp_path)
    finally:
        os.close(other)  # what the kernel does when that process dies, even by kill -9
    common.lock_workdir(tmp_path)
    assert (tmp_path / common.LOCK_NAME).read_text() == f"{os.getpid()}\n"
    common.lock_workdir(tmp_path)  # held already by this process: a no-op


def test_missing_config_file_message_names_the_file_and_the_configs():
    msg = common.missing_config_message(["prog", "--config=experiments/configs/nope.py:x"])
    assert "config file 'experiments/configs/nope.py' does not exist" in msg
    assert "lm.py" in msg and "fairness.py" in msg and "policies_common.py" not in msg
    assert "\n" not in msg


def test_main_needs_a_config_with_train_and_serve_sections():
    from experiments.configs import lm, main

    sections = ("train", "serve", "workload", "sample")
    common.require_sections(main.get_config("runlocal"), "main.py", sections, "why")
    with pytest.raises(ConfigError, match="lm.py has no serve or workload section: why"):
        common.require_sections(lm.get_config("default"), "lm.py", sections, "why")


def test_config_tag_keeps_variants_apart():
    assert common.config_tag("/x/experiments/configs/serve.py:online", home="serve") == "online"
    assert common.config_tag("experiments/configs/serve.py", home="serve") == "default"
    assert common.config_tag("configs/main.py:runlocal", home="serve") == "main_runlocal"


# ---------------------------------------------------------------------------
# Overrides the README shows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["serve.py:runlocal", "main.py:runlocal", "fairness.py"])
def test_policy_args_override_sets_the_policy_settings(spec):
    from mlx_sched.serve.config import ServeConfig

    c = _parse(
        spec, "--config.serve.policy=vtc", "--config.serve.policy_args={'weights': {'a': 2}}"
    )
    serve = ServeConfig.from_dict(c.serve.to_dict())
    assert serve.policy == "vtc" and dict(serve.policy_args) == {"weights": {"a": 2}}


@pytest.mark.parametrize("spec", ["moe_routing.py:runlocal", "main.py:runlocal", "lm.py"])
def test_moe_none_override_turns_moe_off(spec):
    c = _parse(spec, "--config.model.moe=None")
    assert c.model.moe is None and ModelConfig.from_dict(c.model).moe is None


def test_moe_fields_stay_overridable():
    c = _parse("moe_routing.py:runlocal", "--config.model.moe.capacity_factor=2.0")
    assert ModelConfig.from_dict(c.model).moe.capacity_factor == 2.0
    c = _parse("lm.py", "--config.model.moe={'num_experts': 4, 'every': 2, 'offset': 1}")
    assert ModelConfig.from_dict(c.model).moe.num_experts == 4  # and a dict turns it on


# ---------------------------------------------------------------------------
# The table: every bad input through its command line
# ---------------------------------------------------------------------------

LM = "--config=experiments/configs/lm.py:runlocal"
EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

CASES = [
    # (id, module, args, env, the message's text: field, then allowed range or fix)
    ("no_workdir", "train", [LM], {}, "--workdir is required"),
    ("unwritable_workdir", "train", [LM, "--workdir=/sys/mlx_sched_test"], {}, "cannot be created"),
    ("locked_workdir", "train", [LM, "--workdir={w}"], {}, "is in use by process 4242"),
    ("missing_config", "train", ["--config=experiments/configs/nope.py", "--workdir={w}"], {},
     "config file 'experiments/configs/nope.py' does not exist"),
    ("missing_config_and_override", "train",
     ["--config=experiments/configs/nope.py", "--workdir={w}", "--config.train.b2=0.5"], {},
     "config file 'experiments/configs/nope.py' does not exist"),
    ("unknown_variant", "train", ["--config=experiments/configs/lm.py:nope", "--workdir={w}"], {},
     "unknown variant 'nope'"),
    ("typo_key", "train", [LM, "--workdir={w}", "--config.model.d_modle=3"], {},
     "Did you mean 'd_model'"),
    ("data_path", "train", [LM, "--workdir={w}", "--config.data.path=/no/such/dir"], {},
     "does not exist"),
    ("mesh_devices", "train", [LM, "--workdir={w}", "--config.mesh.data=3"], {},
     "uses 3 devices but there are 1"),
    ("mesh_data_vs_batch", "train",
     [LM, "--workdir={w}", "--config.mesh.data=8", "--config.train.batch_size=4"], EIGHT,
     "train.batch_size must be a multiple of 8 (the batch is split over mesh.data=8), got 4"),
    ("mesh_tensor_vs_kv_heads", "train", [LM, "--workdir={w}", "--config.mesh.tensor=8"], EIGHT,
     "mesh.tensor must divide model.n_heads=4 and model.n_kv_heads=2 (one of [1, 2]), got 8"),
    ("steps", "train", [LM, "--workdir={w}", "--config.train.steps=0"], {},
     "train.steps must be > 0, got 0"),
    ("keep_negative", "train", [LM, "--workdir={w}", "--config.train.keep=-1"], {},
     "train.keep must be > 0"),
    ("keep_zero", "train", [LM, "--workdir={w}", "--config.train.keep=0"], {},
     "train.keep must be > 0"),
    ("seed", "train", [LM, "--workdir={w}", "--config.train.seed=-1"], {},
     "train.seed must be >= 0, got -1"),
    ("b2", "train", [LM, "--workdir={w}", "--config.train.b2=1.5"], {},
     "train.b2 must be in [0, 1), got 1.5"),
    ("weight_decay", "train", [LM, "--workdir={w}", "--config.train.weight_decay=-1"], {},
     "train.weight_decay must be >= 0, got -1.0"),
    ("min_lr_ratio", "train", [LM, "--workdir={w}", "--config.train.min_lr_ratio=-1"], {},
     "train.min_lr_ratio must be in [0, 1], got -1.0"),
    ("moe_not_a_section", "train", [LM, "--workdir={w}", "--config.model.moe=abc"], {},
     "model.moe must be None or a dict of MoE settings, got 'abc'"),
    ("seq_len", "train", [LM, "--workdir={w}", "--config.train.seq_len=2048"], {},
     "train.seq_len must be <= model.max_seq_len=1024, got 2048"),
    ("eval_batches", "train", [LM, "--workdir={w}", "--config.train.eval_batches=0"], {},
     "train.eval_batches must be > 0"),
    ("warmup_set_above_steps", "train",
     [LM, "--workdir={w}", "--config.train.steps=5", "--config.train.warmup_steps=10"], {},
     "train.warmup_steps must be in [0, train.steps=5), got 10"),
    ("serve_pool_too_small", "bench_serving",
     ["--config=experiments/configs/serve.py:runlocal", "--workdir={w}",
      "--config.serve.num_pages=2"], {}, "serve.num_pages=2"),
    ("main_without_serve", "main", [LM, "--workdir={w}"], {},
     "has no serve or workload section"),
    ("serve_missing_checkpoint", "serve", ["--checkpoint=/no/such/run", "--workdir={w}"], {},
     "does not exist"),
    ("serve_two_sources", "serve", ["--checkpoint=/a", "--hf_path=/b", "--workdir={w}"], {},
     "not both"),
    ("generate_missing_checkpoint", "generate", ["--checkpoint=/no/such/run"], {},
     "does not exist"),
    ("sweep_missing_config", "sweep", ["--config=experiments/configs/nope.py", "--workdir={w}"],
     {}, "config file 'experiments/configs/nope.py' does not exist"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, args, env, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_cli_bad_input_is_one_clear_line(tmp_path, module, args, env, message):
    workdir = tmp_path / "w"
    if "in use by process" in message:  # another run holds the workdir
        workdir.mkdir()
        held = os.open(workdir / common.LOCK_NAME, os.O_RDWR | os.O_CREAT)
        fcntl.flock(held, fcntl.LOCK_EX)
        os.write(held, b"4242\n")
    full_env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **env}
    out = subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *(a.format(w=workdir) for a in args)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in out.stderr


def test_moe_set_to_a_non_section_is_a_config_error():
    c = _parse("lm.py", "--config.model.moe=abc")
    with pytest.raises(ConfigError, match="model.moe must be None or a dict of MoE settings"):
        loop.model_config(c.model)
