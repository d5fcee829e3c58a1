"""`softprompt export-vllm`: what a vLLM fleet needs to serve an adapter through `--enable-prompt-embeds`.

vLLM takes a soft prompt as the first rows of `prompt_embeds` ([soft prompt ; token embeddings of the templated
prompt], base64 of a `torch.save`d [N + L, hidden] tensor). The export folder holds, per adapter:

- `prompt_embeds.safetensors` (tensor `prompt_embeds`) and `prompt_embeds.pt` (`torch.save`): the N soft-prompt rows
  [N, hidden] to put before the token embeddings, in the dtype asked for (the vLLM server's --dtype);
- `vllm.json`: the method, N, hidden size, dtype, the base model, the template the prompt text must be formatted
  with (and an example of it), and the recipe;
- with `--instruction` (or `--text`): `request.json`, a complete /v1/completions body for that prompt, ready for
  `curl -d @request.json` (this loads the base model for its embedding table).

Prefix-tuning adapters are refused: their keys/values live inside every layer, not in the input embeddings.
The options dataclass imports nothing heavy (the CLI builds its parser without torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from softprompt.options import check_options, device_option, model_option, option

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
FORMAT = "softprompt-vllm-export/1"


@dataclass
class ExportVllmConfig:
    """What `export_vllm` writes and from which adapter."""

    adapter: str = option(
        help="adapter folder (prompt tuning or P-tuning; prefix tuning cannot go through prompt_embeds)",
        positional=True,
    )
    out: str = option(help="folder to write (created; files in it are replaced)", metavar="DIR")
    dtype: str = option(
        "float32",
        "dtype of the exported rows: the vLLM server's --dtype (its `auto` is the model config's torch_dtype)",
        choices=EXPORT_DTYPES,
    )
    instruction: str | None = option(
        None,
        "also write request.json: a /v1/completions body for this instruction, "
        "formatted with the adapter's template (loads the base model)",
    )
    text: str | None = option(None, "like --instruction, but raw text placed right after the soft prompt (no template)")
    served_model_name: str | None = option(
        None,
        "the `model` field of request.json: the name the vLLM server knows the base model by (default: the "
        "adapter's recorded base model)",
        metavar="NAME",
    )
    max_tokens: int = option(64, "max_tokens in request.json", minimum=1)
    task: int | None = option(
        None, "the task to export of a multitask adapter (its prompt for that task; an integer id)", minimum=0,
        maximum=1_000_000,
    )  # fmt: skip
    model: str | None = model_option()
    device: str = device_option()

    def __post_init__(self) -> None:
        check_options(self)
        if self.instruction is not None and self.text is not None:
            raise ValueError("give --instruction or --text, not both")


def export_vllm(config: ExportVllmConfig, base=None) -> dict:
    """Write the export folder (see the module docstring); return what vllm.json holds. `base`: an already loaded
    models.FrozenModel for request.json (otherwise loaded from --model or the adapter's recorded base)."""
    import torch
    from safetensors.torch import save_file

    from softprompt.core.models import DEFAULT_MODEL, DEFAULT_MODEL_NAME, load_base
    from softprompt.formats.adapter import check_fits_context, load_adapter
    from softprompt.vllm.client import check_embeddable, completion_payload

    adapter = load_adapter(config.adapter)
    if config.task is not None:  # a multitask adapter's prompt for one task (refused for other methods)
        adapter = adapter.for_task(config.task, where=config.adapter)
    check_embeddable(adapter)
    recorded = adapter.config.get("base_model_name_or_path")
    model_name = config.model or (DEFAULT_MODEL if recorded in (None, DEFAULT_MODEL_NAME) else recorded)
    context = (
        getattr(base.model.config, "max_position_embeddings", None) if base is not None else _model_context(model_name)
    )
    check_fits_context(adapter.embeddings.shape[0], context, adapter.path or config.adapter)
    dtype = getattr(torch, config.dtype)
    rows = adapter.embeddings.detach().to(device="cpu", dtype=dtype).contiguous()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeds": rows}, str(out / "prompt_embeds.safetensors"))
    torch.save(rows, out / "prompt_embeds.pt")
    info = _description(config, adapter, rows, recorded)
    if config.instruction is not None or config.text is not None:
        if base is None:
            base = load_base(model_name, device=config.device, dtype=config.dtype)
        served = config.served_model_name or recorded or base.name
        kwargs = {"instruction": config.instruction} if config.instruction is not None else {"text": config.text}
        body = completion_payload(served, base, adapter, max_tokens=config.max_tokens, dtype=dtype, **kwargs)
        (out / "request.json").write_text(json.dumps(body) + "\n")
        info["files"]["request.json"] = "a /v1/completions body for " + (
            f"the instruction {config.instruction!r}" if config.instruction is not None else f"the text {config.text!r}"
        )
    (out / "vllm.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info


def _description(config: ExportVllmConfig, adapter, rows, recorded: str | None) -> dict:
    """What vllm.json says: the exported rows, the template to format prompts with, the files and the recipe."""
    template = adapter.template
    return {
        "format": FORMAT,
        "adapter": str(adapter.path or config.adapter),
        "method": adapter.method,
        "base_model": recorded,
        "num_virtual_tokens": int(rows.shape[0]),
        "hidden_size": int(rows.shape[1]),
        "dtype": config.dtype,
        "template": template.spec,
        "template_example": template.prompt("{instruction}", "")
        if template.spec != "chat"
        else "the base model's chat template applied to one user message (add_generation_prompt=True)",
        "files": {
            "prompt_embeds.safetensors": "tensor 'prompt_embeds' [num_virtual_tokens, hidden_size]",
            "prompt_embeds.pt": "the same tensor, torch.save'd",
        },
        "recipe": [
            "start vLLM with --enable-prompt-embeds (and the same base model)",
            "format the prompt text with `template` (what `softprompt generate` does) and tokenize it without "
            "special tokens",
            "embeds = cat([soft prompt rows, base model input-embedding rows of those token ids]) -> "
            "[num_virtual_tokens + L, hidden_size], in the server's dtype",
            "POST /v1/completions {model, prompt_embeds: base64(torch.save(embeds)), max_tokens, ...} and no "
            '`prompt` field (vLLM 0.32 answers 400 to prompt="")',
            "usage.prompt_tokens counts the num_virtual_tokens rows too (as softprompt serve does)",
        ],
    }


def _model_context(model: str) -> int | None:
    """The context length in a base model's config, read without loading the model (None when the config cannot
    be read here: then vLLM itself checks the length)."""
    from transformers import AutoConfig

    from softprompt.core.models import resolve_model_path

    try:
        return getattr(
            AutoConfig.from_pretrained(resolve_model_path(model)[0], local_files_only=True),
            "max_position_embeddings",
            None,
        )
    except Exception:  # noqa: BLE001 (a hub id not cached here, a folder without config.json, ...)
        return None
