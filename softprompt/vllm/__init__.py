"""softprompt's adapters on a vLLM server started with `--enable-prompt-embeds`: `client.py` builds and sends
[soft prompt ; token embeddings] as `prompt_embeds`, `export.py` writes the files `softprompt export-vllm` makes.
Nothing heavy is imported here."""
