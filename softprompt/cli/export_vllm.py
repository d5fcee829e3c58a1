"""`softprompt export-vllm`: flags generated from vllm.export.ExportVllmConfig."""

from __future__ import annotations

import argparse
import json

from softprompt.cli.args import config_from_args
from softprompt.vllm.export import ExportVllmConfig

HELP = "write what a vLLM server (--enable-prompt-embeds) needs to serve an adapter"
DESCRIPTION = (
    "Write an adapter's soft-prompt rows (prompt_embeds.safetensors / .pt: the [N, hidden] rows to put "
    "before the token embeddings of every prompt sent to vLLM as prompt_embeds), vllm.json (method, "
    "sizes, dtype, template and the recipe) and, with --instruction or --text, request.json: a complete "
    "/v1/completions body. Prefix-tuning adapters are refused (their keys/values are not input "
    "embeddings). See docs/vllm.md."
)

OPTIONS = (ExportVllmConfig,)


def run(args: argparse.Namespace) -> int:
    from softprompt.vllm.export import export_vllm

    config = config_from_args(ExportVllmConfig, args)
    info = export_vllm(config)
    print(
        json.dumps(
            {k: info[k] for k in ("method", "num_virtual_tokens", "hidden_size", "dtype", "template", "files")},
            indent=2,
            ensure_ascii=False,
        )
    )
    print(f"softprompt export-vllm: wrote {config.out}")
    return 0
