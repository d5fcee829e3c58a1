"""`softprompt demo`: the built-in compass-game task and the zero-shot -> prompt-tuned -> evaluated story."""
