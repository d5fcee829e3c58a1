"""softprompt: prompt tuning for frozen causal language models.

The data flow, one module per arrow:
records (data) -> template/tokenise (templates, batching) -> [soft prompt ; token embeddings] (prompt, forward)
-> frozen model (models) -> loss (forward) -> adapter file (adapter) -> generate / serve (kvcache, engine, serve).
"""

from .adapter import Adapter, AdapterError, load_adapter, save_adapter
from .models import BaseModel, ModelNotFoundError, describe_parameters, load_base
from .prompt import SoftPrompt
from .templates import Template

__version__ = "0.1.0"
__all__ = ["Adapter", "AdapterError", "BaseModel", "ModelNotFoundError", "SoftPrompt", "Template",
           "describe_parameters", "load_adapter", "load_base", "save_adapter"]
