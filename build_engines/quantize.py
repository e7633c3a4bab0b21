"""NVIDIA ModelOpt: calibrate and quantize, then export a TensorRT-LLM or Hugging Face checkpoint.

Heavy imports (torch, transformers, modelopt) happen inside the functions, so planning and
`--dry-run` stay fast. The quantize stage's output is the calibrated model in two files:
ModelOpt's state (`modelopt_state.pt`: which quantizers sit where) and
`quantized_tensors.safetensors` (every quantizer's amax / pre-quant scale, plus the linear
weights when the algorithm rewrote them, as AWQ does). Both exports restore that onto a fresh
copy of the source model, so an interrupted build never calibrates twice and neither export
sees the in-place changes the other one makes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from build_engines import calibration
from build_engines.checkpoint import TOKENIZER_FILES, CheckpointInfo
from build_engines.errors import InvalidRequest
from build_engines.progress import Progress
from build_engines.request import BuildRequest, Quantization

STATE_FILE = "modelopt_state.pt"
TENSORS_FILE = "quantized_tensors.safetensors"
TORCH_DTYPES = ("float32", "bfloat16", "float16")


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Collect ModelOpt's prints and warnings (and hide transformers' loading bars) so the
    terminal shows our progress only; the stage record keeps the messages."""
    from transformers.utils import logging as hf_logging

    messages: list[str] = []
    stdout = io.StringIO()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
            warnings.simplefilter("always")
            try:
                yield messages
            finally:
                lines = stdout.getvalue().splitlines() + [str(w.message) for w in caught]
                for line in (" ".join(raw.split()) for raw in lines):
                    if line and line not in messages:
                        messages.append(line)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def quant_config_call(request: BuildRequest) -> str:
    """The ModelOpt config expression `quant_config` builds, as the dry run prints it."""
    if request.quant is Quantization.FP8:
        base = "mtq.FP8_DEFAULT_CFG"
    elif request.quant is Quantization.INT4_AWQ:
        base = f"mtq.INT4_AWQ_CFG (weight block size {request.awq_group_size})"
    else:
        return "(none)"
    return f"{base} + mtq.FP8_KV_CFG" if request.kv_cache_fp8 else base


def quant_config(request: BuildRequest) -> dict[str, Any]:
    """A deep copy of ModelOpt's config for the request (its dicts are shared module state)."""
    import modelopt.torch.quantization as mtq

    config: dict[str, Any]
    if request.quant is Quantization.FP8:
        config = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    elif request.quant is Quantization.INT4_AWQ:
        config = copy.deepcopy(mtq.INT4_AWQ_CFG)
        for entry in config["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["block_sizes"][-1] = request.awq_group_size
    else:
        raise ValueError("no ModelOpt config for an unquantized build")
    if request.kv_cache_fp8:
        config["quant_cfg"] = list(config["quant_cfg"]) + copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    return config


def choose_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequest(f"--device {requested} was asked for but torch sees no GPU")
    return requested


def load_source_model(info: CheckpointInfo, device: str) -> Any:
    """The source model for calibration: float32 on CPU (bf16 matmuls there are slow and
    inexact), the checkpoint's own dtype on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype_name = "float32" if device == "cpu" else info.torch_dtype
    dtype = getattr(torch, dtype_name if dtype_name in TORCH_DTYPES else "bfloat16")
    model: Any = AutoModelForCausalLM.from_pretrained(str(info.path), dtype=dtype)
    return model.to(device).eval()


def _forward_loop(
    windows: list[list[int]], device: str, progress: Progress
) -> Callable[[Any], None]:
    import torch

    passes = [0]

    def loop(model: Any) -> None:
        passes[0] += 1  # AWQ runs the data twice: statistics, then the scale search
        with torch.no_grad(), progress.task(f"calibrating, pass {passes[0]}", len(windows)) as step:
            for window in windows:
                model(torch.tensor([window], device=device))
                step(1)

    return loop


def calibrate_and_quantize(
    request: BuildRequest, info: CheckpointInfo, out_dir: Path, progress: Progress
) -> dict[str, Any]:
    """The quantize stage: calibrate on local text, save the calibrated state to `out_dir`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    dataset = request.calib_dataset or calibration.SHIPPED_DIR
    tokenizer = AutoTokenizer.from_pretrained(str(info.path))
    windows = calibration.calibration_windows(
        dataset,
        lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]),
        tokenizer.eos_token_id,
        int(request.calib_size or 1),
        request.calib_seq_len,
    )
    device = choose_device(request.device)
    with captured_output() as messages:
        import modelopt.torch.opt as mto  # its import warns about untested transformers versions
        import modelopt.torch.quantization as mtq

        model = load_source_model(info, device)
        model = mtq.quantize(model, quant_config(request), _forward_loop(windows, device, progress))
    tensors: dict[str, torch.Tensor] = {
        name: value.detach().cpu().contiguous()
        for name, value in model.state_dict().items()
        if "_quantizer." in name
    }
    rewrites_weights = request.quant is Quantization.INT4_AWQ  # AWQ folds its scales in
    quantized_linears = 0
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is not None and quantizer.is_enabled:
            quantized_linears += 1
            if rewrites_weights:
                tensors[f"{name}.weight"] = module.weight.detach().cpu().contiguous()
    torch.save(mto.modelopt_state(model), out_dir / STATE_FILE)
    save_file(tensors, str(out_dir / TENSORS_FILE))
    return {
        "device": device,
        "calibration_dataset": str(dataset),
        "calibration_windows": len(windows),
        "calibration_tokens_per_window": len(windows[0]) if windows else 0,
        "quantized_linears": quantized_linears,
        "modelopt_config": quant_config_call(request),
        "messages": messages,
    }


def restore_quantized(info: CheckpointInfo, quant_dir: Path | None, device: str) -> Any:
    """A fresh source model with the quantize stage's state on it (plain when `quant_dir` is None)."""
    import modelopt.torch.opt as mto
    import torch
    from safetensors.torch import load_file

    model = load_source_model(info, device)
    if quant_dir is None:
        return model
    state = torch.load(quant_dir / STATE_FILE, weights_only=False, map_location=device)
    model = mto.restore_from_modelopt_state(model, state)
    result = model.load_state_dict(
        load_file(str(quant_dir / TENSORS_FILE), device=device), strict=False
    )
    if result.unexpected_keys:
        raise RuntimeError(f"quantized state does not fit the model: {result.unexpected_keys[:3]}")
    return model.eval()


def _fix_rope_config(model: Any, info: CheckpointInfo) -> None:
    # transformers 5 moved rope_theta / rope_scaling into `rope_parameters`; ModelOpt's
    # TensorRT-LLM export still reads the old attributes and silently leaves `rotary_base`
    # (and Llama 3 scaling) out, which TensorRT-LLM would run at its default 10000.
    model.config.rope_theta = info.rope_theta
    if info.rope_scaling:
        kind = info.rope_scaling.get("rope_type", info.rope_scaling.get("type"))
        model.config.rope_scaling = {**info.rope_scaling, "type": kind, "rope_type": kind}


def export_trtllm_call(request: BuildRequest, info: CheckpointInfo, export_dir: Path) -> str:
    return (
        "modelopt.torch.export.export_tensorrt_llm_checkpoint(model, "
        f"decoder_type={info.decoder_type!r}, dtype=torch.{request.dtype.value}, "
        f"export_dir={str(export_dir)!r}, inference_tensor_parallel={request.tp}, "
        f"inference_pipeline_parallel={request.pp})"
    )


def export_trtllm_checkpoint(
    request: BuildRequest, info: CheckpointInfo, quant_dir: Path | None, out_dir: Path
) -> dict[str, Any]:
    """The export stage (engine trtllm): `config.json` + `rank{i}.safetensors` per tp×pp rank."""
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint as export

    device = choose_device(request.device)
    # Expected among the messages: ModelOpt misses `tensorrt_llm` and writes the config itself.
    with captured_output() as messages:
        model = restore_quantized(info, quant_dir, device)
        _fix_rope_config(model, info)
        export(
            model,
            decoder_type=info.decoder_type,
            dtype=getattr(torch, request.dtype.value),
            export_dir=out_dir,
            inference_tensor_parallel=request.tp,
            inference_pipeline_parallel=request.pp,
        )
    copy_tokenizer(info, out_dir)
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    return {"device": device, "config": config, "messages": messages}


def export_hf_call(info: CheckpointInfo, export_dir: Path) -> str:
    return (
        "modelopt.torch.export.export_hf_checkpoint(model, "
        f"dtype=torch.{info.torch_dtype}, export_dir={str(export_dir)!r})"
    )


def export_hf_checkpoint(
    request: BuildRequest, info: CheckpointInfo, quant_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """The export stage (engine torch): a quantized Hugging Face checkpoint + tokenizer files.

    Unquantized layers keep the source dtype: the weights were quantized from it, and
    config.json (which ModelOpt does not rewrite) keeps naming it.
    """
    import torch
    from modelopt.torch.export import export_hf_checkpoint as export

    device = choose_device(request.device)
    dtype = getattr(torch, info.torch_dtype if info.torch_dtype in TORCH_DTYPES else "bfloat16")
    with captured_output() as messages:
        model = restore_quantized(info, quant_dir, device)
        export(model, dtype=dtype, export_dir=out_dir)
    copy_tokenizer(info, out_dir)
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    hf_quant = json.loads((out_dir / "hf_quant_config.json").read_text(encoding="utf-8"))
    return {"device": device, "config": config, "hf_quant_config": hf_quant, "messages": messages}


def copy_tokenizer(info: CheckpointInfo, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        source = info.path / name
        if source.exists() and not (out_dir / name).exists():
            shutil.copy2(source, out_dir / name)
            copied.append(name)
    return copied
