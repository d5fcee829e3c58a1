import os
import sys
from pathlib import Path

# Before torch is imported: with the default (active) wait policy, OpenMP threads spin for each other, which makes
# tiny models up to ~100x slower whenever anything else uses the CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from helpers import TEST_DEVICE, save_tiny, tiny_base  # noqa: E402

if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
    raise pytest.UsageError(f"SOFTPROMPT_TEST_DEVICE={TEST_DEVICE} but torch sees no CUDA device")


# Bits depend on the thread count (fp32 sums are split across threads), so every test and every fixture runs at a
# fixed one. Tiny models run fastest on one thread, and module- or session-scoped fixtures (set up before any
# function-scoped fixture) must compute their reference results at the same count as the tests that compare with
# them: the whole session is pinned to one thread here, at import. Tests marked slow (the real model) run on
# SLOW_THREADS threads, fixed for the session; they compute what they compare inside the test.
SLOW_THREADS = torch.get_num_threads()
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def pinned_threads(request):
    """One thread for every test; SLOW_THREADS for tests marked slow. Restored afterwards either way."""
    threads = SLOW_THREADS if request.node.get_closest_marker("slow") else 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    """A tiny random Llama with a character-level tokenizer (a models.FrozenModel)."""
    return tiny_base()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny):
    """The same tiny model saved as a Hugging Face folder (for --model DIR)."""
    return save_tiny(tiny, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def default_base():
    """The real embedded default model, SmolLM2-135M-Instruct (converted once and cached)."""
    from softprompt.core.models import load_base

    return load_base(device="cpu", dtype="float32")
