"""The run directory: resolved config, manifest, and the paths of every artifact.

    RUN/config.yaml                 the resolved config (what `--resume` runs with)
    RUN/manifest.json               versions, seed, the config as last accepted and the judge prompt's digest, and
                                    per stage: status, counts, seconds
    RUN/data/{ift,eft}.jsonl        the seed data this run trained on (a snapshot)
    RUN/models/M1, M2, ...          checkpoints, Hugging Face layout, safetensors (models/SFT: the SFT baseline)
    RUN/iter_<t>/prompts.jsonl      AIFT data made by M(t): prompts, candidates, judgments, pairs
    RUN/summary.json                the end-of-run summary

A stage counts as complete only when the manifest says so, and the manifest is updated (atomically)
after the stage's outputs are fully written and renamed into place.
"""
from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path

from .config import NOT_PINNED, PINNED_SINCE, RunConfig, config_to_yaml
from .errors import RunDirError
from .records import LockHeld, atomic_write_text, take_lock

FORMAT_VERSION = 1
TRACKED_PACKAGES = ("srlm", "torch", "transformers", "trl", "accelerate", "datasets", "pydantic")


def text_digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def first_process() -> bool:
    """Whether this process is rank 0 of an `accelerate launch` (or runs alone): the one that guards and pins
    what all the ranks share."""
    import os

    return os.environ.get("RANK", "0") == "0"


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # paths
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def model(self, t: int) -> Path:
        return self.root / "models" / f"M{t}"

    @property
    def sft_baseline(self) -> Path:
        return self.root / "models" / "SFT"

    def iteration(self, t: int) -> Path:
        return self.root / f"iter_{t}"

    def data(self, name: str) -> Path:
        return self.root / "data" / f"{name}.jsonl"

    # lifecycle
    def create(self, config: RunConfig, *, template: str | None = None) -> None:
        if self.manifest_path.exists():
            raise RunDirError(f"{self.root}: already holds a run; continue it with `srlm run --resume {self.root}` "
                              "or choose another --out")
        # What `create` itself writes before the manifest: a crash in between leaves only these, and may start over.
        own = {self.config_path.name, self.config_path.name + ".tmp", self.manifest_path.name + ".tmp", ".lock"}
        if self.root.is_dir() and (foreign := sorted(p.name for p in self.root.iterdir() if p.name not in own)):
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise RunDirError(f"{self.root}: not empty and not a srlm run (it holds {shown}); a new run would mix "
                              "its files with these. Choose another --out, or an empty or new directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"{self.root}: cannot make the run directory: {e.strerror or e}")
        # Held before anything is written: two runs given one directory at once (the default name is by the second)
        # wrote each other's config and manifest, and one ran on the other's.
        self.lock()
        if self.manifest_path.exists():
            self.unlock()
            raise RunDirError(f"{self.root}: another srlm made a run here just now; choose another --out")
        atomic_write_text(self.config_path, config_to_yaml(config))
        self.write_manifest({
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seed": config.seed,
            "versions": versions(),
            # The config this run's artifacts were made under, kept where editing config.yaml by hand does not
            # reach: a resume compares the config it is given (config.yaml, --set) with this one.
            "config": config.model_dump(mode="json"),
            **({} if template is None else {"judge_template_sha256": text_digest(template)}),
            "stages": {},
        })

    def record_config(self, config: RunConfig, *, template: str | None = None) -> None:
        """Accept `config` as this run's from now on (a resume that changed what may change): in config.yaml, for
        the next `--resume`, and in the manifest, for comparing it with; with `template`, its digest too."""
        atomic_write_text(self.config_path, config_to_yaml(config))
        manifest = self.read_manifest()
        manifest["config"] = config.model_dump(mode="json")
        if template is not None:
            manifest["judge_template_sha256"] = text_digest(template)
        self.write_manifest(manifest)

    def open(self) -> dict:
        if not self.root.is_dir():
            raise RunDirError(f"{self.root}: no such run directory")
        if not self.manifest_path.exists():
            raise RunDirError(f"{self.root}: not a srlm run directory (no manifest.json)")
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{self.manifest_path}: unreadable manifest: {e}")
        if not isinstance(manifest, dict):
            raise RunDirError(f"{self.manifest_path}: not a srlm manifest (expected a JSON object, found "
                              f"{type(manifest).__name__})")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise RunDirError(f"{self.manifest_path}: made by a srlm with run format "
                              f"{manifest.get('format_version')!r}; this srlm reads format {FORMAT_VERSION}")
        if not isinstance(manifest.get("stages"), dict) or not all(
                isinstance(entry, dict) for entry in manifest["stages"].values()):
            raise RunDirError(f"{self.manifest_path}: not a srlm manifest (its 'stages' is not an object of objects)")
        return manifest

    def lock(self) -> None:
        """Hold the run directory for this process's life: a second srlm on it (two `--resume`s) would write the
        same records files at once and lose some, with the manifest calling the stage complete.

        Under `accelerate launch` the ranks share the run by design; rank 0 holds it for all of them. A file system
        without locks (NFS without lockd) goes unguarded."""
        if not first_process() or getattr(self, "_lock", None) is not None:
            return
        try:
            self._lock = take_lock(self.root / ".lock")
        except LockHeld as e:
            raise RunDirError(f"{self.root}: in use by another srlm process (pid {e.holder}); wait for it to end, or "
                              "stop it, before running this one on it") from None

    def unlock(self) -> None:
        """Let go of the run directory (`lock`); at the latest the process's end does."""
        handle, self._lock = getattr(self, "_lock", None), None
        if handle is not None:
            handle.close()

    def read_manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")

    def is_complete(self, stage: str) -> bool:
        return self.read_manifest()["stages"].get(stage, {}).get("status") == "complete"

    def mark_complete(self, stage: str, seconds: float, counts: dict) -> None:
        manifest = self.read_manifest()
        manifest["stages"][stage] = {"status": "complete", "seconds": round(seconds, 2), "counts": counts,
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.write_manifest(manifest)


def pin_settings(path: Path, settings: dict, what: str, *, holder: Path | None = None,
                 start_over: str = "delete the directory to start over") -> None:
    """Record the settings an output was started with (`path`, JSON) and refuse to continue it under others:
    resumed files would mix two experiments. `what` names what `holder` (by default the directory of `path`) holds,
    and `start_over` how to begin afresh, for the message."""
    if path.exists():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            before = e
        if not isinstance(before, dict):
            found = before if isinstance(before, Exception) else f"a JSON {type(before).__name__}"
            raise RunDirError(f"{path}: not the JSON object of settings srlm writes ({found}), so {holder or path.parent} "
                              f"cannot be told apart from {what} of other settings; use another --out, or {start_over}")
        # Pinned by an earlier srlm: keys it pinned that this one does not, and lacking keys pinned since.
        before = {k: v for k, v in before.items() if k in settings or k not in NOT_PINNED}
        before.update({k: settings[k] for k in PINNED_SINCE if k in settings and k not in before})
        if before != settings:
            # A key only one side has: one an older srlm did not write, or one this version no longer writes.
            show = lambda d, k: repr(d[k]) if k in d else "(not recorded)"
            changed = ", ".join(f"{k}: {show(before, k)} -> {show(settings, k)}" for k in dict.fromkeys([*before, *settings])
                                if k not in before or k not in settings or before[k] != settings[k])
            raise RunDirError(f"{holder or path.parent}: holds {what} made with other settings ({changed}); use "
                              f"another --out, or {start_over}")
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def pin_output(out: Path, settings: dict, what: str, *, companions: tuple[str, ...] = ()) -> None:
    """`pin_settings` for a stage command's output file `out`, in `<out>.settings.json`: rerunning the stage into
    `out` resumes it (from `<out>.partial`) or returns it as it is, under the same settings only; under others (a
    different model, input or config) it would hand back, or continue, records of another experiment.

    `companions`: the names of other files the stage writes beside `out` and resumes from (the prompts stage's
    `<stem>_attempts.jsonl`), each with its `.partial`: the output is started over only when all are gone."""
    sidecar = out.with_name(out.name + ".settings.json")
    files = [out, *(out.with_name(name) for name in companions)]
    files = [f for base in files for f in (base, base.with_name(base.name + ".partial"))]
    start_over = f"delete {' and '.join(f.name for f in files)} to start over"
    if not any(f.exists() for f in files):
        sidecar.unlink(missing_ok=True)  # nothing left to continue: what it said no longer applies
    elif not sidecar.exists():
        raise RunDirError(f"{out}: exists, and no {sidecar.name} says what made it, so it cannot be told apart from "
                          f"{what} of other settings; use another --out, or {start_over}")
    pin_settings(sidecar, settings, what, holder=out, start_over=start_over)
