"""Stage bookkeeping, calibration windows and target versions: plain functions, no ModelOpt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from build_engines import calibration
from build_engines.errors import InvalidRequest, StageFailed
from build_engines.progress import Progress
from build_engines.stages import Stage, StageContext, execute, preview
from build_engines.versions import FALLBACK_TENSORRT_LLM, target_versions


def make_stages(calls: list[str], value: str = "a", fail: bool = False) -> list[Stage]:
    def first(context: StageContext) -> dict[str, str]:
        calls.append("first")
        (context.out / "data.txt").write_text(value)
        return {"value": value}

    def second(context: StageContext) -> dict[str, str]:
        calls.append("second")
        if fail:
            raise ValueError("boom\nsecond line")
        data = (context.out.parent / "first" / "data.txt").read_text()
        (context.out / "copy.txt").write_text(data)
        return {}

    return [
        Stage("first", "First", "first()", {"value": value}, first),
        Stage("second", "Second", "second()", {}, second),
    ]


def test_a_finished_stage_is_skipped(tmp_path: Path) -> None:
    calls: list[str] = []
    execute(make_stages(calls), tmp_path, Progress())
    results = execute(make_stages(calls), tmp_path, Progress())
    assert calls == ["first", "second"]
    assert [r.status for r in results.values()] == ["skipped", "skipped"]
    assert results["first"].details == {"value": "a"}


def test_changed_inputs_rerun_the_stage_and_everything_after(tmp_path: Path) -> None:
    calls: list[str] = []
    execute(make_stages(calls), tmp_path, Progress())
    execute(make_stages(calls, value="b"), tmp_path, Progress())
    assert calls == ["first", "second", "first", "second"]
    assert (tmp_path / "second" / "copy.txt").read_text() == "b"


def test_a_damaged_output_reruns_the_stage_and_those_after(tmp_path: Path) -> None:
    calls: list[str] = []
    execute(make_stages(calls), tmp_path, Progress())
    (tmp_path / "first" / "data.txt").write_text("longer than before")
    assert [p.up_to_date for p in preview(make_stages([]), tmp_path)] == [False, False]
    execute(make_stages(calls), tmp_path, Progress())
    assert calls == ["first", "second", "first", "second"]


def test_a_failed_stage_leaves_no_record_and_one_line(tmp_path: Path) -> None:
    calls: list[str] = []
    with pytest.raises(StageFailed) as caught:
        execute(make_stages(calls, fail=True), tmp_path, Progress())
    message = str(caught.value)
    assert message.startswith("second failed: ValueError: boom (traceback: ")
    assert "\n" not in message
    assert "Traceback" in (tmp_path / "second.log").read_text()
    assert not (tmp_path / "second.json").exists()
    assert json.loads((tmp_path / "first.json").read_text())["status"] == "ran"
    execute(make_stages(calls), tmp_path, Progress())
    assert calls == ["first", "second", "second"]  # resumes at the failed stage


def test_force_reruns_everything(tmp_path: Path) -> None:
    calls: list[str] = []
    execute(make_stages(calls), tmp_path, Progress())
    execute(make_stages(calls), tmp_path, Progress(), force=True)
    assert calls == ["first", "second"] * 2


def test_calibration_windows_are_evenly_spaced_and_overlap_when_short() -> None:
    tokens = list(range(100))
    windows = calibration.token_windows(tokens, 3, 10)
    assert windows == [list(range(0, 10)), list(range(45, 55)), list(range(90, 100))]
    assert calibration.token_windows(tokens[:5], 2, 10) == [tokens[:5], tokens[:5]]


def test_calibration_reads_text_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "c.json").write_text('["three", {"text": "four"}]')
    assert calibration.read_documents(tmp_path) == ["plain text", "one", "two", "three", "four"]
    (tmp_path / "d.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(
        InvalidRequest, match=r'd\.jsonl: expected strings or objects with a "text"'
    ):
        calibration.read_documents(tmp_path)


def test_the_shipped_calibration_set_is_there() -> None:
    documents = calibration.read_documents(calibration.SHIPPED_DIR)
    assert len(documents) >= 6 and sum(map(len, documents)) > 10_000


def test_target_versions_come_from_containers_versions_toml(tmp_path: Path) -> None:
    target = target_versions()
    assert target.tensorrt_llm == "1.2.1"
    assert target.triton_image.endswith(f"{target.triton_release}-trtllm-python-py3")
    fallback = target_versions(tmp_path / "missing.toml")
    assert fallback.tensorrt_llm == FALLBACK_TENSORRT_LLM
    assert fallback.source.startswith("built-in fallback")
