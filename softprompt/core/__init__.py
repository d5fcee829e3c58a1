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
METHODS = ("prompt", "prefix", "ptuning", "cartridge")
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "ptuning": "P_TUNING", "cartridge": "CARTRIDGE"}
# CPT (PEFT's Context-aware Prompt Tuning): the prompt is the embeddings of in-context examples plus a trained,
# norm-bounded delta; once saved it is input embeddings, served like prompt tuning.
METHODS += ("cpt",)
PEFT_TYPES["cpt"] = "CPT"
CPT_LOSSES = ("none", "decay")  # PEFT's opt_weighted_loss_type
KV_METHODS = ("prefix", "cartridge")
ENCODER_TYPES = ("mlp", "lstm")
