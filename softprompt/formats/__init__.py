"""What softprompt writes to disk: PEFT-format adapter folders and resumable training checkpoints.

Only safetensors and JSON are read and written, never pickle; folders are replaced atomically.
"""
