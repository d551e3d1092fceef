"""What a reproduction run does with what is already in its folder, decided before computing.

A run's *key* is everything its numbers depend on (scale and its sizes, seed, device, ntkit
and torch versions). In the run folder:

- a checkpoint ``checkpoints/<name>.json`` of the same key is reused under ``--resume``;
- an experiment of the same key that this run does not compute (in a checkpoint or in
  ``results.json``) is kept: the new ``results.json`` and report cover it too;
- results of another key that this run would overwrite are refused unless ``force``;
- a malformed checkpoint (invalid JSON, wrong shape, changed since ntkit wrote it) is
  reported, set aside as ``<name>.json.damaged`` when this run needs its name, and
  recomputed; it never crashes the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from .rundir import RunDir

CHECKPOINT_DIR = "checkpoints"
Problem = Callable[[str, Any], "str | None"]  # (experiment, results) -> what is wrong


def _describe(key: Any) -> str:
    if not isinstance(key, dict):
        return "unknown settings"
    return (f"scale {key.get('scale')}, seed {key.get('seed')}, device {key.get('device')}, "
            f"ntkit {key.get('ntkit')}, torch {key.get('torch')}")


def checkpoint_rel(name: str) -> str:
    return f"{CHECKPOINT_DIR}/{name}.json"


def read_checkpoint(run_dir: RunDir, name: str, problem: Problem) -> tuple[str, Any]:
    """Classify ``checkpoints/<name>.json``: ("absent" | "foreign", None), ("damaged",
    what is wrong) or ("ok", the saved ``{"key", "seconds", "results"}``)."""
    rel = checkpoint_rel(name)
    path = run_dir.path / rel
    if not path.exists():
        return "absent", None
    if rel not in run_dir.files:
        return "foreign", None  # not ntkit's: neither read nor touched
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return "damaged", f"it is not valid JSON ({err})"
    if not isinstance(saved, dict):
        return "damaged", f"it holds a JSON {type(saved).__name__}, not an object"
    missing = [k for k in ("key", "seconds", "results") if k not in saved]
    if missing:
        return "damaged", f"it lacks the field(s) {missing}"
    if not isinstance(saved["seconds"], (int, float)) or isinstance(saved["seconds"], bool):
        return "damaged", "its 'seconds' is not a number"
    wrong = problem(name, saved["results"])
    if wrong:
        return "damaged", wrong
    if not run_dir.owns(rel):
        return "damaged", "its contents changed since ntkit wrote it"
    return "ok", saved


def read_saved_run(run_dir: RunDir, problem: Problem) -> tuple[dict | None, dict]:
    """The run folder's own results.json (None if absent or not ntkit's) and timings."""
    doc, seconds = None, {}
    if run_dir.owns("results.json"):
        try:
            doc = json.loads((run_dir.path / "results.json").read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("experiments"), dict):
                doc = None
        except (OSError, ValueError):
            doc = None
    if doc is not None:
        doc["experiments"] = {name: res for name, res in doc["experiments"].items()
                              if problem(name, res) is None}
    if run_dir.owns("timings.json"):
        try:
            seconds = dict(json.loads((run_dir.path / "timings.json").read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            seconds = {}
    return doc, seconds


def plan_run(run_dir: RunDir, names: tuple[str, ...], experiments: tuple[str, ...], key: dict,
             *, resume: bool, force: bool, problem: Problem) -> dict:
    """Decide, before any computation, what is reused, merged, recomputed and replaced.

    Returns ``reuse`` and ``merge`` (name -> (results, seconds)), ``set_aside`` (damaged
    checkpoints to rename), ``replace`` (whether a run of other settings is replaced) and
    ``notices`` (messages for the user, to show once the run is known to go ahead).
    Raises ``ValueError`` when (unless ``force``) the run would replace results of a run
    with other settings.
    """
    reuse, merge, set_aside, replaced, notices = {}, {}, [], {}, []
    saved_doc, saved_seconds = read_saved_run(run_dir, problem)
    if saved_doc is not None and saved_doc["experiments"]:
        if saved_doc.get("key") == key:
            for name, res in saved_doc["experiments"].items():
                if name in names and name not in experiments:
                    merge[name] = (res, float(saved_seconds.get(name, math.nan)))
        else:
            replaced["results.json"] = (saved_doc.get("key"), sorted(saved_doc["experiments"]))
    for name in names:
        status, saved = read_checkpoint(run_dir, name, problem)
        rel = checkpoint_rel(name)
        if status == "damaged":
            if name in experiments:
                set_aside.append(rel)
                notices.append(f"Checkpoint {str(run_dir.path / rel)!r} is malformed: {saved}. "
                               f"It is kept as {rel}.damaged (numbered if that name is taken) "
                               f"and {name!r} is recomputed.")
            else:
                notices.append(f"Checkpoint {str(run_dir.path / rel)!r} is malformed: {saved}. "
                               f"{name!r} is not part of this run; the file is left as it is.")
            continue
        if status != "ok":
            continue
        if saved["key"] == key:
            if name in experiments and resume:
                reuse[name] = (saved["results"], float(saved["seconds"]))
            elif name not in experiments:
                merge[name] = (saved["results"], float(saved["seconds"]))
        elif name in experiments:
            replaced[rel] = (saved["key"], [name])
    if replaced and not force:
        lines = "; ".join(f"{rel}: {', '.join(exps)} with {_describe(old)}"
                          for rel, (old, exps) in replaced.items())
        raise ValueError(
            f"{str(run_dir.path)!r} holds results of a run with other settings ({lines}). This "
            f"run ({_describe(key)}) would replace them. Choose another folder with --out, "
            "or pass --force to replace that run (ntkit's own files of it only).")
    return {"reuse": reuse, "merge": merge, "set_aside": set_aside, "replace": bool(replaced),
            "notices": notices}
