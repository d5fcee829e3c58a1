"""softprompt: prompt tuning for frozen causal language models.

The data flow, one module per arrow:
records (data) -> template/tokenise (templates, batching) -> [soft prompt ; token embeddings] (prompt, forward)
-> frozen model (models) -> loss (forward) -> adapter file (adapter) -> generate / serve (kvcache, engine, serve).

The one-call-per-step API (imported lazily, so `import softprompt` stays light):

    base = load_base()                                           # embedded SmolLM2-135M-Instruct, or a name/folder
    train(TrainConfig(data="alpaca.jsonl", out="runs/a", model=base))
    evaluate("heldout.jsonl", model=base, adapters=["runs/a"], compare_base=True)
    generate("Give three tips for staying healthy.", base=base, adapter="runs/a")
    Engine(base, {"a": load_adapter("runs/a", base)})           # batched, mixed-adapter generation
"""

from importlib import import_module

from .adapter import Adapter, AdapterError, load_adapter, save_adapter
from .models import BaseModel, ModelNotFoundError, describe_parameters, load_base
from .prompt import SoftPrompt
from .templates import Template

__version__ = "0.1.0"

_LAZY = {
    "TrainConfig": "softprompt.train", "train": "softprompt.train",
    "evaluate": "softprompt.evaluate",
    "generate": "softprompt.generate", "generate_batch": "softprompt.generate",
    "Engine": "softprompt.engine", "GenerationRequest": "softprompt.engine",
    "inspect_adapter": "softprompt.inspect_adapter",
    "run_demo": "softprompt.demo",
}

__all__ = ["Adapter", "AdapterError", "BaseModel", "ModelNotFoundError", "SoftPrompt", "Template",
           "describe_parameters", "load_adapter", "load_base", "save_adapter", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
