import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import save_tiny, tiny_base  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """A tiny random Llama with a character-level tokenizer (a models.BaseModel)."""
    return tiny_base()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny):
    """The same tiny model saved as a Hugging Face folder (for --model DIR)."""
    return save_tiny(tiny, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def default_base():
    """The real embedded default model, SmolLM2-135M-Instruct (converted once and cached)."""
    from softprompt.models import load_base

    return load_base(device="cpu", dtype="float32")
