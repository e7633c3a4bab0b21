"""`cortex build-engine`: flags → `BuildRequest` → plan → stages. No logic of its own.

Registered in cortex/cli.py with `app.command("build-engine")(build_engine)`. Exit codes:
0 published (or already up to date, or a dry run), 2 the request cannot be built (one line on
stderr), 3 stopped before `trtllm-build` because TensorRT-LLM is not installed here (the line
names the NGC image to rerun it in), 130 interrupted (rerun to resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from build_engines.errors import BuildError
from build_engines.pipeline import BuildPlan, make_plan, run_plan
from build_engines.progress import RichProgressReporter
from build_engines.request import (
    DEFAULT_AWQ_GROUP_SIZE,
    DEFAULT_CALIB_SEQ_LEN,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_NUM_TOKENS,
    BuildRequest,
    ExportDtype,
    KvCacheQuantization,
    Quantization,
)
from build_engines.stages import Stage
from cortex.config import EngineKind


def build_engine(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="Hugging Face checkpoint folder (safetensors).",
            metavar="CHECKPOINT_DIR",
            show_default=False,
        ),
    ],
    quant: Annotated[
        Quantization,
        typer.Option(help="fp8 (weights and KV cache), int4_awq (W4A16, AWQ) or none."),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Model store: the build publishes into OUTPUT/NAME/.",
            show_default=False,
        ),
    ],
    tp: Annotated[int, typer.Option(help="Tensor-parallel size (GPUs per pipeline stage).")] = 1,
    pp: Annotated[int, typer.Option(help="Pipeline-parallel size.")] = 1,
    engine: Annotated[
        EngineKind,
        typer.Option(
            help="trtllm: a TensorRT-LLM engine for the tensorrtllm backend; torch: a quantized "
            "Hugging Face checkpoint for cortex's torch engine (one device)."
        ),
    ] = EngineKind.TRTLLM,
    name: Annotated[
        str | None,
        typer.Option(help="Model name [default: CHECKPOINT-QUANT-tpN].", show_default=False),
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(help="Engine: most requests in flight at once.")
    ] = DEFAULT_MAX_BATCH_SIZE,
    max_input_len: Annotated[
        int | None,
        typer.Option(
            help="Engine: longest prompt in tokens [default: --max-seq-len].", show_default=False
        ),
    ] = None,
    max_seq_len: Annotated[
        int | None,
        typer.Option(
            help="Engine: longest prompt + output [default: the model's context, at most 8192].",
            show_default=False,
        ),
    ] = None,
    max_num_tokens: Annotated[
        int, typer.Option(help="Engine: most tokens in one forward pass (batch × chunk).")
    ] = DEFAULT_MAX_NUM_TOKENS,
    calib_dataset: Annotated[
        Path | None,
        typer.Option(
            help="Folder of .txt/.md/.jsonl/.json calibration text [default: the set cortex ships].",
            show_default=False,
        ),
    ] = None,
    calib_size: Annotated[
        int | None,
        typer.Option(
            help="Calibration windows [default: 512 for fp8, 64 for int4_awq].", show_default=False
        ),
    ] = None,
    calib_seq_len: Annotated[
        int, typer.Option(help="Tokens per calibration window.")
    ] = DEFAULT_CALIB_SEQ_LEN,
    awq_group_size: Annotated[
        int, typer.Option(help="INT4-AWQ weights per scale (TensorRT-LLM takes 64 or 128).")
    ] = DEFAULT_AWQ_GROUP_SIZE,
    kv_cache: Annotated[
        KvCacheQuantization,
        typer.Option(
            help="KV-cache quantization; auto is fp8 for --quant fp8 with --engine trtllm."
        ),
    ] = KvCacheQuantization.AUTO,
    dtype: Annotated[
        ExportDtype,
        typer.Option(
            help="TensorRT-LLM checkpoint dtype; auto keeps float16 sources, else bfloat16."
        ),
    ] = ExportDtype.AUTO,
    device: Annotated[
        str,
        typer.Option(
            help="Where ModelOpt calibrates: auto (a GPU if torch sees one), cpu, cuda:N."
        ),
    ] = "auto",
    kv_cache_free_gpu_mem_fraction: Annotated[
        float,
        typer.Option(help="Published Triton config: share of free GPU memory for the KV cache."),
    ] = 0.9,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print every stage's exact call or command; run nothing."),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Rerun every stage and replace a published model of that name."
        ),
    ] = False,
) -> None:
    """Quantize (ModelOpt FP8 / INT4-AWQ), build a TensorRT-LLM engine and publish it.

    Stages: inspect → quantize → export (TensorRT-LLM checkpoint at --tp/--pp, or a Hugging
    Face checkpoint for --engine torch) → build (trtllm-build, where TensorRT-LLM is installed)
    → verify → publish into OUTPUT/NAME/ with manifest.json and a models.toml entry. A rerun
    skips every stage whose inputs did not change, so an interrupted build resumes.
    """
    console = Console(stderr=True, soft_wrap=True)
    request = BuildRequest(
        checkpoint=checkpoint,
        quant=quant,
        output=output,
        tp=tp,
        pp=pp,
        engine=engine,
        name=name,
        max_batch_size=max_batch_size,
        max_input_len=max_input_len,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        calib_dataset=calib_dataset,
        calib_size=calib_size,
        calib_seq_len=calib_seq_len,
        awq_group_size=awq_group_size,
        kv_cache=kv_cache,
        dtype=dtype,
        device=device,
        kv_cache_free_gpu_mem_fraction=kv_cache_free_gpu_mem_fraction,
        force=force,
    )
    try:
        plan = make_plan(request)
        for warning in plan.info.warnings:
            console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
        if dry_run:
            typer.echo(format_plan(plan))
            return
        progress = RichProgressReporter(console)

        def announce(stage: Stage, up_to_date: bool) -> None:
            state = "[dim]up to date, skipped[/dim]" if up_to_date else ""
            console.print(f"[bold]{stage.key}[/bold] {stage.title} {state}", highlight=False)

        results = run_plan(plan, progress, announce)
    except BuildError as error:
        label = "[yellow]stopped:[/yellow]" if error.exit_code == 3 else "[red]error:[/red]"
        console.print(f"{label} {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command to resume after the last finished stage")
        raise typer.Exit(130) from None
    published = plan.publish_dir
    ran = [key for key, result in results.items() if result.status != "skipped"]
    console.print(
        f"published {published}" + ("" if ran else " (already up to date)"), highlight=False
    )
    typer.echo(f"# models.toml entry ({published / 'models.toml'}):")
    typer.echo((published / "models.toml").read_text(encoding="utf-8"), nl=False)


def format_plan(plan: BuildPlan) -> str:
    request = plan.request
    lines = [
        f"cortex build-engine plan: {request.name} → {plan.publish_dir}",
        f"target: TensorRT-LLM {plan.target.tensorrt_llm} in {plan.target.triton_image} "
        f"(from {plan.target.source})",
        f"work folder: {plan.work_dir}",
    ]
    for number, item in enumerate(plan.preview(), 1):
        stage = item.stage
        if item.up_to_date:
            status = "up to date (skip)"
        elif stage.key == "build" and plan.trtllm_build is None:
            status = "stops here: needs TensorRT-LLM"
        else:
            status = "run"
        lines.append(f"{number}. {stage.key} [{status}] {stage.title}")
        lines.append(f"   {stage.call}")
    return "\n".join(lines)
