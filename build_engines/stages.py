"""Resumable stages: run each one once per set of inputs, skip it when nothing changed.

A stage writes into its own folder `WORK/<key>/`; when it returns, a record `WORK/<key>.json`
is written (atomically) with the hash of its inputs, the files it produced and what it reports.
The record is the commit marker: a stage interrupted half-way has no record, so its folder is
wiped and it runs again. A stage is skipped when its record's hash matches, every recorded file
is still there with its size, and no earlier stage ran in this invocation. The hash of each
stage folds in the previous stage's, so changing an early input re-runs everything after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from build_engines.errors import BuildError, StageFailed
from build_engines.progress import Progress

RECORD_FORMAT = 1


@dataclass
class StageContext:
    out: Path
    progress: Progress
    results: dict[str, StageResult]
    inputs_hash: str


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    # The exact call or command this stage makes, for --dry-run and the logs.
    call: str
    inputs: dict[str, Any]
    run: Callable[[StageContext], dict[str, Any]]
    # Extra condition for skipping (e.g. the published copy still matches).
    still_valid: Callable[[str], bool] | None = None
    # Output produced outside cortex that can stand in for running (returns its details).
    adopt: Callable[[Path], dict[str, Any] | None] | None = None


@dataclass
class StageResult:
    key: str
    status: str  # "ran" | "skipped" | "adopted"
    inputs_hash: str
    out: Path
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def stage_hash(stage: Stage, upstream: str) -> str:
    payload = json.dumps(
        {"stage": stage.key, "inputs": stage.inputs, "upstream": upstream},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def record_path(work_dir: Path, key: str) -> Path:
    return work_dir / f"{key}.json"


def read_record(work_dir: Path, key: str) -> dict[str, Any] | None:
    try:
        record = json.loads(record_path(work_dir, key).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def listing(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _intact(record: dict[str, Any], out: Path) -> bool:
    files = record.get("files") or {}
    return out.is_dir() and all(
        (out / name).is_file() and (out / name).stat().st_size == size
        for name, size in files.items()
    )


def write_json_atomic(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(temporary, path)


@dataclass(frozen=True)
class StagePreview:
    stage: Stage
    inputs_hash: str
    up_to_date: bool


def preview(stages: list[Stage], work_dir: Path, force: bool = False) -> list[StagePreview]:
    """What `execute` would do, without doing it (the dry run)."""
    previews: list[StagePreview] = []
    upstream, dirty = "", force
    for stage in stages:
        digest = stage_hash(stage, upstream)
        current = not dirty and _is_current(stage, digest, work_dir)
        previews.append(StagePreview(stage, digest, current))
        dirty = dirty or not current
        upstream = digest
    return previews


def _is_current(stage: Stage, digest: str, work_dir: Path) -> bool:
    record = read_record(work_dir, stage.key)
    return (
        record is not None
        and record.get("inputs_hash") == digest
        and _intact(record, work_dir / stage.key)
        and (stage.still_valid is None or stage.still_valid(digest))
    )


def execute(
    stages: list[Stage],
    work_dir: Path,
    progress: Progress,
    force: bool = False,
    on_start: Callable[[Stage, bool], None] | None = None,
) -> dict[str, StageResult]:
    """Run the stages in order, skipping those that are current; returns every stage's result."""
    work_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, StageResult] = {}
    for item in preview(stages, work_dir, force):
        stage, digest = item.stage, item.inputs_hash
        if on_start is not None:
            on_start(stage, item.up_to_date)
        out = work_dir / stage.key
        if item.up_to_date:
            record = read_record(work_dir, stage.key) or {}
            results[stage.key] = StageResult(
                stage.key, "skipped", digest, out, 0.0, record.get("details") or {}
            )
            continue
        record_path(work_dir, stage.key).unlink(missing_ok=True)
        adopted = stage.adopt(out) if stage.adopt is not None and out.is_dir() else None
        started = time.monotonic()
        if adopted is not None:
            status, details = "adopted", adopted
        else:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            status = "ran"
            details = _run(stage, StageContext(out, progress, results, digest), work_dir)
        seconds = time.monotonic() - started
        results[stage.key] = StageResult(stage.key, status, digest, out, seconds, details)
        write_json_atomic(
            record_path(work_dir, stage.key),
            {
                "format": RECORD_FORMAT,
                "stage": stage.key,
                "status": status,
                "inputs_hash": digest,
                "inputs": stage.inputs,
                "call": stage.call,
                "seconds": round(seconds, 3),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "details": details,
                "files": listing(out),
            },
        )
    return results


def _run(stage: Stage, context: StageContext, work_dir: Path) -> dict[str, Any]:
    try:
        return stage.run(context)
    except BuildError:
        raise
    except Exception as error:  # any library failure: one line + a log
        log = work_dir / f"{stage.key}.log"
        log.write_text("".join(traceback.format_exception(error)), encoding="utf-8")
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise StageFailed(
            f"{stage.key} failed: {type(error).__name__}: {first_line} (traceback: {log})"
        ) from None
