"""The model side: loading a frozen causal LM, the soft prompt, and the forward pass with the prompt in front.

- `models`: load a base model (folder, hub id, GGUF file or the embedded default), device and dtype choice;
- `attention`: grouped-query attention without key/value copies on the CPU;
- `prompt`: the soft prompt (N trainable vectors) and its initialisations;
- `forward`: [soft prompt ; tokens] -> frozen body -> loss on answer tokens; the prompt's keys/values.
"""

# Declared here (torch-free) so that config dataclasses can offer them as choices without importing torch.
INIT_METHODS = ("text", "vocab", "random", "labels")
