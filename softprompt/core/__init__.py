"""The model side: loading a frozen causal LM, the soft prompt, and the forward pass with the prompt in front.

- `models`: load a base model (folder, hub id, GGUF file or the embedded default), device and dtype choice;
- `attention`: grouped-query attention without key/value copies on the CPU;
- `prompt`: the trainable soft prompts of each method (prompt tuning, prefix tuning, P-tuning, cartridges) and their
  initialisations;
- `forward`: [soft prompt ; tokens] -> frozen body -> loss on answer tokens; a soft prompt's per-layer keys/values
  (whatever its method).
"""

# Declared here (torch-free) so that config dataclasses can offer them as choices without importing torch.
INIT_METHODS = ("text", "vocab", "random", "labels", "zero")

# The prompt-learning methods (PEFT's PROMPT_TUNING, PREFIX_TUNING, P_TUNING and CARTRIDGE) and P-tuning's encoder
# kinds. KV_METHODS are those whose saved tensor is per-layer keys/values rather than input embeddings: they are run,
# cached and served by one path (core.forward.prefix_kv), whatever produced them while training.
METHODS = ("prompt", "prefix", "ptuning", "cartridge", "multitask")
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "ptuning": "P_TUNING", "cartridge": "CARTRIDGE"}
PEFT_TYPES["multitask"] = "MULTITASK_PROMPT_TUNING"  # a shared prompt times per-task low-rank factors, per task
KV_METHODS = ("prefix", "cartridge")
ENCODER_TYPES = ("mlp", "lstm")
# How a multitask prompt starts from a source adapter (PEFT's AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK and
# ONLY_SOURCE_SHARED): the source's shared prompt and its task factors averaged, or one task's, or the shared prompt
# alone (fresh factors).
MULTITASK_INITS = ("average-tasks", "exact-task", "shared-only")
# How fresh task factors start: near-one (cols @ rows ~ 1, so every task's prompt starts at the shared prompt) or peft
# (N(0, 0.02) as PEFT draws them, so every task's prompt starts near zero).
FACTOR_INITS = ("near-one", "peft")
