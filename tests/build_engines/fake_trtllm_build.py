"""A FAKE `trtllm-build` for tests: TensorRT-LLM cannot be installed on these machines.

It parses the flags `build_engines.trtllm.build_command` passes and writes what the real tool
writes (TensorRT-LLM 1.2's `Engine.save`): `config.json` with `version`, `pretrained_config`
(the checkpoint's config) and `build_config`, plus one `rank{i}.engine` per rank. The engines
are placeholder bytes. FAKE_TRTLLM_VERSION sets the version it claims (default 1.2.1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(prog="trtllm-build (fake)")
    parser.add_argument("--checkpoint_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    for flag in (
        "max_batch_size",
        "max_input_len",
        "max_seq_len",
        "max_num_tokens",
        "max_beam_width",
        "tokens_per_block",
        "workers",
    ):
        parser.add_argument(f"--{flag}", type=int, required=True)
    for flag in (
        "kv_cache_type",
        "gpt_attention_plugin",
        "gemm_plugin",
        "nccl_plugin",
        "context_fmha",
        "use_paged_context_fmha",
        "use_fp8_context_fmha",
        "remove_input_padding",
        "use_fused_mlp",
        "multiple_profiles",
        "logits_dtype",
        "log_level",
    ):
        parser.add_argument(f"--{flag}", required=True)
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint_dir)
    pretrained = json.loads((checkpoint / "config.json").read_text())
    world = pretrained["mapping"]["world_size"]
    if sorted(checkpoint.glob("rank*.safetensors")) != [
        checkpoint / f"rank{rank}.safetensors" for rank in range(world)
    ]:
        print("[TRT-LLM] [E] rank files do not match mapping.world_size", file=sys.stderr)
        return 1
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    build_config = {
        key: getattr(args, key)
        for key in (
            "max_batch_size",
            "max_input_len",
            "max_seq_len",
            "max_num_tokens",
            "max_beam_width",
        )
    }
    build_config["kv_cache_type"] = args.kv_cache_type.upper()
    build_config["plugin_config"] = {
        "tokens_per_block": args.tokens_per_block,
        "use_paged_context_fmha": args.use_paged_context_fmha == "enable",
    }
    config = {
        "version": os.environ.get("FAKE_TRTLLM_VERSION", "1.2.1"),
        "pretrained_config": {**pretrained, "logits_dtype": args.logits_dtype},
        "build_config": build_config,
    }
    (output / "config.json").write_text(json.dumps(config, indent=4))
    for rank in range(world):
        (output / f"rank{rank}.engine").write_bytes(b"FAKE ENGINE " + str(rank).encode())
        print(f"[TRT-LLM] [I] (fake) built rank {rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
