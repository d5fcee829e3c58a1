"""softprompt: prompt tuning for frozen causal language models.

One call per step:

    from softprompt import TrainConfig, evaluate, generate, load_base, train

    base = load_base()                                           # embedded SmolLM2-135M-Instruct, or a name/folder
    train(TrainConfig(data="alpaca.jsonl", out="runs/a", model=base))
    evaluate("heldout.jsonl", model=base, adapters=["runs/a"], compare_base=True)
    generate("Give three tips for staying healthy.", base=base, adapter="runs/a")

The package is layered (see docs/architecture.md): `core`, `data` and `formats` at the bottom; `training`,
`inference`, `evaluation`, `serve` and `vllm` above them; `demo` and `cli` on top. Every name below is imported
lazily, so `import softprompt` (and `softprompt --help`) stays light.
"""

from importlib import import_module

from softprompt.runtime import configure_openmp_waits

configure_openmp_waits()  # before anything imports torch: OpenMP reads its wait settings once, at start (runtime.py)

__version__ = "0.1.0"

_PUBLIC = {
    "FrozenModel": "softprompt.core.models",
    "ModelNotFoundError": "softprompt.core.models",
    "load_base": "softprompt.core.models",
    "describe_parameters": "softprompt.core.models",
    "SoftPrompt": "softprompt.core.prompt",
    "Template": "softprompt.data.templates",
    "Adapter": "softprompt.formats.adapter",
    "AdapterError": "softprompt.formats.adapter",
    "load_adapter": "softprompt.formats.adapter",
    "save_adapter": "softprompt.formats.adapter",
    "TrainConfig": "softprompt.training.config",
    "TrainResult": "softprompt.training.loop",
    "train": "softprompt.training.loop",
    "Engine": "softprompt.inference.engine",
    "GenerationRequest": "softprompt.inference.batch",
    "generate": "softprompt.api",
    "generate_batch": "softprompt.api",
    "evaluate": "softprompt.api",
    "inspect_adapter": "softprompt.evaluation.inspect",
    "create_app": "softprompt.api",
    "run_demo": "softprompt.api",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
