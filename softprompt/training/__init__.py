"""Training a soft prompt: the configuration, the loop, optimisers and schedules, scoring and metrics.

`softprompt.training.config` imports nothing heavy, so the command line can read its options without torch.
"""
