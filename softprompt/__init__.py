"""softprompt: prompt tuning for frozen causal language models.

The data flow, one module per arrow:
records (data) -> template/tokenise (templates, batching) -> [soft prompt ; token embeddings] (prompt, forward)
-> frozen model (models) -> loss (forward) -> adapter file (adapter) -> generate / serve (kvcache, engine, serve).

One call per step (each verb's function lives in the module of the same name):

    from softprompt import load_base
    from softprompt.train import TrainConfig, train
    from softprompt.evaluate import evaluate
    from softprompt.generate import generate

    base = load_base()                                           # embedded SmolLM2-135M-Instruct, or a name/folder
    train(TrainConfig(data="alpaca.jsonl", out="runs/a", model=base))
    evaluate("heldout.jsonl", model=base, adapters=["runs/a"], compare_base=True)
    generate("Give three tips for staying healthy.", base=base, adapter="runs/a")

`TrainConfig`, `Engine`, `GenerationRequest`, `generate_batch` and `run_demo` are also importable from here
(lazily, so `import softprompt` stays light).
"""

from importlib import import_module

from .adapter import Adapter, AdapterError, load_adapter, save_adapter
from .models import BaseModel, ModelNotFoundError, describe_parameters, load_base
from .prompt import SoftPrompt
from .templates import Template

__version__ = "0.1.0"

# Functions named like their module (train, evaluate, generate, inspect_adapter) are not re-exported: importing
# the submodule would rebind the package attribute to the module.
_LAZY = {
    "TrainConfig": "softprompt.train",
    "generate_batch": "softprompt.generate",
    "Engine": "softprompt.engine", "GenerationRequest": "softprompt.engine",
    "run_demo": "softprompt.demo",
}

__all__ = ["Adapter", "AdapterError", "BaseModel", "ModelNotFoundError", "SoftPrompt", "Template",
           "describe_parameters", "load_adapter", "load_base", "save_adapter", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
