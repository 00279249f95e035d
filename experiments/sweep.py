"""Run every point of a config file's sweep; skip points already done; write one table + plots.

  python -m experiments.sweep --config=experiments/configs/moe_routing.py:runlocal \
      --workdir=/tmp/moe_sweep [--only=switch_cf1,dense] [--list] [--config.train.steps=40]

A config file that offers a sweep defines, beside `get_config(arg)`:

  get_sweep(arg) -> list of {"name": str, **{"dotted.key": value}}   # the points
  summarize(rows, workdir) -> str (optional)                         # plots + markdown

and its config has a `kind` field naming the point runner in
`experiments/points.py` ("train", ...). Each point runs in its own
subprocess (a crash or kill loses only that point) and writes
`<workdir>/<name>/result.json`; a re-run skips points whose result exists.
`--config.a.b=v` overrides apply to every point's base config; a point's own
value for the same key wins. The sweep holds `<workdir>/.lock` while it runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

from absl import flags, logging
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file with get_sweep(), e.g. x.py:variant", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "sweep folder; one sub-folder per point")
_ONLY = flags.DEFINE_list("only", None, "run only these point names")
_LIST = flags.DEFINE_bool("list", False, "print the points and exit")
_POINT = flags.DEFINE_string("point", None, "internal: run this one point in this process")


def load_module(spec: str):
    """The config module named by 'path/to/file.py[:variant]', and the variant."""
    path, _, variant = spec.partition(":")
    p = pathlib.Path(path)
    if not p.exists():
        raise common.ConfigError(f"config file '{path}' does not exist")
    mod_spec = importlib.util.spec_from_file_location(p.stem, p)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise common.ConfigError(f"{path} defines no get_sweep(); it has no sweep to run")
    return module, (variant or "default")


def point_config(module, variant: str, point: dict, overrides: dict | None = None):
    """The base config with the command line's `overrides` (flat dotted keys) and then the
    point's dotted-key settings applied (unknown keys are errors)."""
    config = module.get_config(variant)
    for key, value in {**(overrides or {}), **point}.items():
        if key == "name":
            continue
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node:
                raise common.ConfigError(f"sweep point '{point['name']}': unknown key '{key}'")
            node = node[part]
        if parts[-1] not in node:
            raise common.ConfigError(f"sweep point '{point['name']}': unknown key '{key}'")
        with node.ignore_type():
            node[parts[-1]] = value
    return config


def points_of(module, variant: str) -> list[dict]:
    points = module.get_sweep(variant)
    names = [p["name"] for p in points]
    if len(set(names)) != len(names):
        raise common.ConfigError(f"sweep point names are not unique: {names}")
    return points


def run_one(
    module, variant: str, point: dict, workdir: pathlib.Path, overrides: dict | None = None
) -> dict:
    from experiments import points as point_runners

    config = point_config(module, variant, point, overrides)
    kind = config.get("kind", "train")
    if kind not in point_runners.RUNNERS:
        raise common.ConfigError(
            f"unknown point kind '{kind}'; known: {sorted(point_runners.RUNNERS)}"
        )
    t0 = time.perf_counter()
    result = point_runners.RUNNERS[kind](config, workdir)
    result = {"name": point["name"], **{k: v for k, v in point.items() if k != "name"}, **result}
    result["wall_s"] = time.perf_counter() - t0
    (workdir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no results)\n"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def override_args(argv: list[str]) -> list[str]:
    """The `--config.a.b=v` (or `--config.a.b v`) arguments of `argv`, to pass to a point's
    process as they were given."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith(("--config.", "-config.", "--noconfig.", "-noconfig.")):
            takes_next = "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("-")
            out += [a, argv[i + 1]] if takes_next else [a]
    return out


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise common.ConfigError(
            "--config is required, e.g. --config=experiments/configs/x.py:variant"
        )
    spec = flags.FLAGS["config"].config_filename
    overrides = dict(flags.FLAGS["config"].override_values)
    module, variant = load_module(spec)
    points = points_of(module, variant)
    for p in points:
        mine = sorted(set(overrides) & set(p) - {"name"})
        if mine:
            logging.warning(
                "point %s sets %s itself; its value wins over --config", p["name"], mine
            )
    if _LIST.value:
        if overrides:
            print("every point:", overrides)
        for p in points:
            print(p["name"], {k: v for k, v in p.items() if k != "name"})
        return
    workdir = common.require_workdir(_WORKDIR.value)
    if _POINT.value:  # child process: one point, under the parent's lock
        (point,) = [p for p in points if p["name"] == _POINT.value]
        pdir = workdir / point["name"]
        pdir.mkdir(parents=True, exist_ok=True)
        run_one(module, variant, point, pdir, overrides)
        return
    common.lock_workdir(workdir)
    selected = [p for p in points if not _ONLY.value or p["name"] in _ONLY.value]
    if _ONLY.value and len(selected) != len(_ONLY.value):
        known = [p["name"] for p in points]
        raise common.ConfigError(f"--only names {_ONLY.value} not all in the sweep: {known}")
    failed = []
    for i, point in enumerate(selected):
        done = workdir / point["name"] / "result.json"
        if done.exists():
            logging.info("[%d/%d] %s: done already, skipping", i + 1, len(selected), point["name"])
            continue
        logging.info("[%d/%d] %s: running", i + 1, len(selected), point["name"])
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "experiments.sweep",
            f"--config={spec}",
            *override_args(sys.argv[1:]),
            f"--workdir={workdir}",
            f"--point={point['name']}",
        ]
        out = subprocess.run(cmd, env=os.environ.copy(), capture_output=True, text=True)
        (workdir / point["name"]).mkdir(parents=True, exist_ok=True)
        (workdir / point["name"] / "log.txt").write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            logging.error("%s failed (exit %d): %s", point["name"], out.returncode, tail)
            failed.append(point["name"])
        else:
            logging.info("%s: finished in %.0fs", point["name"], time.perf_counter() - t0)
    rows = [
        json.loads((workdir / p["name"] / "result.json").read_text())
        for p in points
        if (workdir / p["name"] / "result.json").exists()
    ]
    (workdir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = markdown_table(rows)
    if hasattr(module, "summarize"):
        summary = module.summarize(rows, workdir)
    (workdir / "results.md").write_text(summary)
    print(summary)
    print(f"results: {workdir / 'results.md'} ({len(rows)}/{len(points)} points done)")
    if failed:
        print(f"failed points (see their log.txt; re-run to retry): {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    common.run(main)
