"""The keyword facade: `softprompt.generate(...)`, `generate_batch`, `evaluate`, `run_demo`, `create_app`.

Each function builds its layer's config object from keyword arguments (the same option declarations the command
line is generated from, so the same values are accepted and refused with the same messages) and calls the layer's
entry point, which takes the config object itself.
"""

from __future__ import annotations

from pathlib import Path

from softprompt.core.models import FrozenModel
from softprompt.demo.config import DEFAULT_OUT, DemoConfig
from softprompt.evaluation.config import EvalConfig
from softprompt.inference.config import BatchOptions, GenerationOptions
from softprompt.serve.config import ServeConfig


def generate(instruction: str, input: str = "", *, base: FrozenModel | None = None, on_text=None, **options) -> str:
    """Answer one instruction; `options` are GenerationOptions' fields (adapter, greedy, temperature, top_k, top_p,
    seed, max_new_tokens, stop, truncate, repetition_penalty, chat_template, model, device, dtype). `on_text(piece)`
    is called with each newly final piece of text (streaming)."""
    from softprompt.inference import generate as layer

    return layer.generate(GenerationOptions(**options), instruction, input, base=base, on_text=on_text)


def generate_batch(records: list[dict], *, base: FrozenModel | None = None, **options) -> list[dict]:
    """Answer many records in mixed-task batches; `options` are BatchOptions' fields (those of `generate` plus
    adapters_dir, batch_size, progress, logprobs). Returns each record plus 'output' (and 'logprobs' when asked)."""
    from softprompt.inference import generate as layer

    return layer.generate_batch(records, BatchOptions(**options), base=base)


def evaluate(data, model: str | FrozenModel | None = None, adapters: list[str | Path] = (), **options) -> dict:
    """Evaluate the base model and each adapter on `data` (a path or a list of dicts); `options` are EvalConfig's
    fields (e.g. choices, compare_base, max_new_tokens=0 to skip greedy generation, skip_bad)."""
    from softprompt.evaluation import evaluate as layer

    return layer.evaluate(EvalConfig(data=data, model=model, adapters=list(adapters), **options))


def run_demo(
    out: str | Path = DEFAULT_OUT, model: str | FrozenModel | None = None, *, print_fn=print, **options
) -> dict:
    """Run the demo into `out` (`options`: DemoConfig's fields); returns the metrics written to
    OUT/demo_results.json."""
    from softprompt.demo import run as layer

    return layer.run_demo(DemoConfig(out=str(out), model=model, **options), print_fn=print_fn)


def create_app(base: FrozenModel, adapters_dir: str | Path | None = None, *, template=None, **options):
    """The server app for `base` and the adapter folders under `adapters_dir`; `options` are ServeConfig's fields
    (max_batch, max_queue, max_tokens_cap, max_model_len, api_key, allow_admin, max_request_bytes, allowed_hosts,
    allow_origins, prefix_cache_mb, chat_template). `template`: the default template (a data.templates.Template)."""
    from softprompt.serve import app as layer

    adapters = None if adapters_dir is None else str(adapters_dir)
    return layer.create_app(base, ServeConfig(adapters=adapters, **options), template=template)
