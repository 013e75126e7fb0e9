"""Reproducibility from a run's manifest: rerun it elsewhere, and say what differs between runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill4all import atomic
from distill4all.config import LoadedConfig, load_config, to_yaml
from distill4all.errors import RunDirError
from distill4all.layout import RunLayout
from distill4all.run import environment


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest.json, or the one inside a run directory."""
    if path.is_dir():
        path = RunLayout(path).manifest
    if not path.is_file():
        raise RunDirError(f"no manifest at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}:{e.lineno}: not a valid manifest ({e.msg})") from None
    if not isinstance(data, dict) or "config" not in data:
        raise RunDirError(f"{path} is not a distill4all manifest")
    return data


@dataclass(frozen=True)
class Difference:
    where: str
    a: Any
    b: Any


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        out = {}
        for i, v in enumerate(obj):
            out |= _flatten(v, f"{prefix}[{i}]")
        return out
    return {prefix: obj}


# What is expected to differ between any two runs, and so is not a difference worth showing.
_VOLATILE = ("created_at", "updated_at", "started_at", "finished_at", "seconds", "run_id", "config_file")


def diff_manifests(a: dict[str, Any], b: dict[str, Any]) -> list[Difference]:
    """Config, environment, inputs, and each stage's status, counts and artifact hashes."""
    diffs = []
    for section in ("config", "environment", "inputs", "stages", "costs"):
        fa, fb = _flatten(a.get(section, {}), section), _flatten(b.get(section, {}), section)
        for key in sorted(fa.keys() | fb.keys()):
            if key.rsplit(".", 1)[-1] in _VOLATILE or ".upstream." in key:
                continue
            if fa.get(key) != fb.get(key):
                diffs.append(Difference(key, fa.get(key, "—"), fb.get(key, "—")))
    return diffs


@dataclass
class ReproducePlan:
    config_path: Path
    loaded: LoadedConfig
    warnings: list[str]


def _rebase_out_dirs(config: dict[str, Any], old: Path, new: Path) -> list[str]:
    """A stage folder moved by `out_dir` must not point back into the recorded run: inside it, it
    moves along with the run directory; elsewhere, the stage writes to its default folder."""
    notes = []
    for stage in ("export", "eval"):
        section = config.get(stage)
        if not isinstance(section, dict) or not isinstance(section.get("out_dir"), str):
            continue
        folder = Path(section["out_dir"])
        if folder.is_relative_to(old):
            section = section | {"out_dir": str(new / folder.relative_to(old))}
        else:
            section = section | {"out_dir": None}
            notes.append(f"{stage}.out_dir {folder} is outside the recorded run: this run writes {stage}/ instead")
        config[stage] = section
    return notes


def prepare_reproduction(manifest_path: Path, run_dir: Path, *, allow_changed_inputs: bool = False) -> ReproducePlan:
    """Write the manifest's config (secrets still as ${VAR}) beside a new run directory and check
    that the inputs are the same files; the caller then runs it."""
    manifest = read_manifest(manifest_path)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir} exists and is not empty; choose a new run directory")
    warnings = []
    then = manifest.get("environment", {}).get("packages", {})
    now = environment()["packages"]
    for name in sorted(then.keys() | now.keys()):
        if then.get(name) != now.get(name):
            warnings.append(f"{name}: {then.get(name, 'absent')} then, {now.get(name, 'absent')} now")
    changed = []
    for path, digest in manifest.get("inputs", {}).items():
        p = Path(path)
        if not p.is_file():
            changed.append(f"{path} is missing")
        elif atomic.sha256_file(p) != digest:
            changed.append(f"{path} has changed")
    if changed and not allow_changed_inputs:
        raise RunDirError("the inputs differ from the recorded run: " + "; ".join(changed))
    warnings += changed
    config = dict(manifest["config"]) | {"run_dir": str(run_dir.resolve())}
    warnings += _rebase_out_dirs(config, Path(str(manifest["config"]["run_dir"])), run_dir.resolve())
    config_path = run_dir.parent / f"{run_dir.name}.yaml"
    atomic.write_text(config_path, f"# reproduces {manifest_path}\n" + to_yaml(config))
    return ReproducePlan(config_path, load_config(config_path), warnings)
