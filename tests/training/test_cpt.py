"""CPT (--method cpt, PEFT's Context-aware Prompt Tuning): its context, its training rule against real PEFT 0.21
(the bounds and projection of CPTEmbedding, the loss and gradient of PeftModelForCausalLM's CPT forward, none and
decay), what a trained CPT prompt keeps fixed, and its options."""

import json

import pytest
import torch
from helpers import tiny_tokenizer
from train_helpers import RECORDS, config, train_until, trainable_base

from softprompt.cli import main
from softprompt.core.prompt import ContextPrompt, build_prompt, cpt_epsilon, cpt_loss_weights, cpt_project
from softprompt.data import batching
from softprompt.data.context import encode_context, pick_context
from softprompt.data.records import DataError, Record, load_records
from softprompt.data.templates import Template
from softprompt.formats.adapter import load_adapter
from softprompt.options import OptionError
from softprompt.training import loop as train_module
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train

peft = pytest.importorskip("peft")

TYPES = [1, 1, 2, 2, 2, 3, 4, 4, 0, 5, 6, 6, 7, 8, 8, 9, 10, 11, 12]


def peft_embedding(types: list[int], hidden: int, epsilon: float, format_epsilon: float, **loss):
    config = peft.CPTConfig(
        task_type="CAUSAL_LM",
        cpt_token_ids=list(range(len(types))),
        cpt_tokens_type_mask=types,
        opt_projection_epsilon=epsilon,
        opt_projection_format_epsilon=format_epsilon,
        **loss,
    )
    config.token_dim = hidden
    return peft.tuners.cpt.CPTEmbedding(config, torch.nn.Embedding(len(types) + 1, hidden))


@pytest.mark.parametrize("hidden, epsilon, format_epsilon", [(32, 0.1, 0.1), (576, 0.3, 0.05), (2048, 1.0, 0.0)])
def test_bounds_and_projection_are_peft_s_bit_for_bit(hidden, epsilon, format_epsilon):
    theirs = peft_embedding(TYPES, hidden, epsilon, format_epsilon)
    bound = cpt_epsilon(TYPES, epsilon, format_epsilon, hidden)
    assert torch.equal(bound, theirs.get_epsilon())
    generator = torch.Generator().manual_seed(hidden)
    for scale in (1e-3, 0.01, 0.1, 1.0):  # rows inside, across and far outside their bounds
        delta = torch.randn(len(TYPES), hidden, generator=generator) * scale
        delta[3] = 0  # a row that has not moved stays untouched
        theirs.delta_embedding.weight.data = delta.clone()
        assert torch.equal(cpt_project(delta, bound), theirs.get_projection())


def test_decay_weights_count_back_from_the_row_s_own_answer():
    types = [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert cpt_loss_weights(types, "none", 0.5).tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert cpt_loss_weights(types, "decay", 0.5).tolist() == [0, 0, 0, 0.125, 0.125, 0, 0, 0, 0.25, 0, 0, 0, 0.5]


def test_context_tokens_and_types():
    """The context is the examples as training rows tokenise them, typed as PEFT's CPT types them; the classes take
    turns, seeded."""
    tok = tiny_tokenizer()
    records = [Record("Is it good?", "great film", "positive", "f:1"), Record("Rate:", "", "negative", "f:2")]
    context = encode_context(records, tok, Template("human-assistant"))
    first = batching.encode_records(records[:1], tok, Template("human-assistant"), 512)[0][0]
    assert context.token_ids[: len(first)] == first.ids
    text = "".join(tok.convert_ids_to_tokens(context.token_ids))
    assert text == "Human: Is it good?\ngreat film\n\nAssistant: positive<eos>Human: Rate:\n\nAssistant: negative<eos>"
    kinds = "".join(str(t) for t in context.type_mask)
    assert kinds == "1" * 7 + "2" * 11 + "1" + "2" * 10 + "3" * 13 + "4" * 9 + "5" * 7 + "6" * 5 + "7" * 13 + "8" * 9
    user = encode_context(records[:1], tok, Template("Review: {instruction} / {input} =>"))
    assert "".join(str(t) for t in user.type_mask) == "1" * 8 + "2" * 11 + "1" * 3 + "2" * 10 + "3" * 3 + "4" * 9
    many = [Record(str(i), "", "yes" if i % 3 else "no", f"f:{i}") for i in range(12)]
    picked = pick_context(many, 4, seed=1, label_words=["yes", "no"])
    assert [r.output for r in picked] == ["yes", "no", "yes", "no"]
    assert picked == pick_context(many, 4, seed=1, label_words=["yes", "no"]) != pick_context(many, 4, seed=2)


def prepared(base, tmp_path, monkeypatch, loss: str, factor: float = 1.0):
    """One training step over all of RECORDS from a CPT prompt whose delta is already off zero (within its
    bounds): the step's loss, the gradient it clipped, the prompt and the adapter's config."""
    seen = {}

    def started(*args):
        prompt = real(*args)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            prompt.delta.copy_(torch.randn(prompt.delta.shape, generator=generator) * 0.02 * prompt.moves)
            prompt.project_()
        seen["delta"] = prompt.delta.detach().clone()
        return prompt

    def clip(params, norm):
        seen["grad"] = params[0].grad.clone()
        return real_clip(params, norm)

    real, real_clip = train_module._context_prompt, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(train_module, "_context_prompt", started)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    options = dict(cpt_examples=3, cpt_loss=loss, init=None, max_steps=1, batch_size=len(RECORDS), lr=1e-3)
    if loss == "decay":
        options["cpt_decay_factor"] = factor
    result = train(config(tmp_path, base, method="cpt", optimizer="adamw", **options))
    return result.train_loss, seen, json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize("loss, factor", [("none", 1.0), ("decay", 0.5)])
def test_a_step_s_loss_and_gradient_are_peft_s(tmp_path, monkeypatch, loss, factor):
    """PEFT's CPT forward on the same rows (one batch: prompt tokens and pads -100), the same context and delta,
    gives the loss softprompt's step reports and the delta's gradient it clips."""
    base = trainable_base()
    ours, seen, saved = prepared(base, tmp_path, monkeypatch, loss, factor)
    assert saved["opt_weighted_loss_type"] == loss and saved["opt_loss_decay_factor"] == factor
    cfg = peft.CPTConfig(
        task_type="CAUSAL_LM",
        **{k: saved[k] for k in ("cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask")},
        opt_weighted_loss_type=loss,
        opt_loss_decay_factor=factor,
    )
    model = peft.get_peft_model(trainable_base().model, cfg)
    model.prompt_encoder.default.delta_embedding.weight.data = seen["delta"].clone()
    examples = batching.encode_records(load_records(RECORDS).items, base.tokenizer, Template(), 512)[0]
    batch = batching.collate(examples, base.tokenizer.pad_token_id)
    out = model(**batch)
    out.loss.backward()
    assert abs(out.loss.item() - ours) < 1e-5
    theirs = model.prompt_encoder.default.delta_embedding.weight.grad
    assert torch.allclose(seen["grad"], theirs, atol=1e-6, rtol=1e-4)
    assert theirs.abs().sum() > 0


def test_training_moves_only_template_and_input_tokens_within_their_bounds(tmp_path):
    base = trainable_base()
    result = train(config(tmp_path / "run", base, method="cpt", init=None, lr=0.3, cpt_examples=2, cpt_epsilon=0.5))
    adapter = load_adapter(result.adapter_dir, base)
    cfg = adapter.config
    assert adapter.method == "cpt" and cfg["peft_type"] == "CPT" and cfg["opt_projection_epsilon"] == 0.5
    types = cfg["cpt_tokens_type_mask"]
    assert adapter.num_virtual_tokens == cfg["num_virtual_tokens"] == len(cfg["cpt_token_ids"]) == len(types)
    table = base.model.get_input_embeddings().weight.detach()
    moved = (adapter.embeddings - table[torch.tensor(cfg["cpt_token_ids"])]).norm(dim=1)
    bound = cpt_epsilon(types, 0.5, 0.1, 32)
    outputs = torch.tensor([t % 4 == 0 for t in types])
    assert torch.all(moved[outputs] == 0)
    assert torch.all(moved <= bound * (1 + 1e-5)) and moved[~outputs].min() > 0
    assert torch.isclose(moved[~outputs], bound[~outputs], rtol=1e-4).any()  # lr 0.3: some reach their bound
    assert json.loads((tmp_path / "run" / "softprompt.json").read_text())["init"] == "context"


def test_resume_continues_a_cpt_run_bit_for_bit(tmp_path, monkeypatch):
    base = trainable_base()
    options = dict(method="cpt", init=None, cpt_examples=2, lr=0.03, save_every=4)
    whole = train(config(tmp_path / "a", base, **options))
    train_until(config(tmp_path / "b", base, **options), monkeypatch, 9)
    resumed = train(config(tmp_path / "b", base, resume=str(tmp_path / "b"), **options))
    assert resumed.train_loss == whole.train_loss
    assert torch.equal(load_adapter(whole.adapter_dir).embeddings, load_adapter(resumed.adapter_dir).embeddings)


def test_gradient_checkpointing_gives_the_same_cpt_step(tmp_path):
    """Under --gradient-checkpointing the prompt is concatenated to the rows and the context scored in a pass of its
    own: the same loss and adapter as the shared-prefix path."""
    base = trainable_base()
    plain = train(config(tmp_path / "p", base, method="cpt", init=None, cpt_examples=2, lr=0.03, max_steps=3))
    checked = train(
        config(
            tmp_path / "c",
            base,
            method="cpt",
            init=None,
            cpt_examples=2,
            lr=0.03,
            max_steps=3,
            gradient_checkpointing=True,
        )
    )
    assert abs(plain.train_loss - checked.train_loss) < 1e-5
    assert torch.allclose(load_adapter(plain.adapter_dir).embeddings, load_adapter(checked.adapter_dir).embeddings)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"cpt_examples": 0}, r"--cpt-examples must be >= 1, got 0"),
        ({"cpt_epsilon": -0.1}, r"--cpt-epsilon must be >= 0, got -0.1"),
        ({"cpt_format_epsilon": 101}, r"--cpt-format-epsilon must be <= 100, got 101"),
        ({"cpt_loss": "sum"}, r"--cpt-loss must be one of none, decay, got 'sum'"),
        ({"cpt_loss": "decay", "cpt_decay_factor": 0}, r"--cpt-decay-factor must be > 0, got 0"),
        ({"cpt_decay_factor": 0.5}, r"--cpt-decay-factor is for --cpt-loss decay \(this run has --cpt-loss none\)"),
        ({"init": "vocab"}, r"--init / --init-text / --init-file are not for --method cpt"),
        (
            {"method": "prompt", "cpt_examples": 2},
            r"--cpt-examples is for --method cpt \(this run has --method prompt\)",
        ),
        ({"method": "prefix", "cpt_loss": "decay"}, r"--cpt-loss is for --method cpt \(this run has --method prefix\)"),
    ],
)
def test_bad_cpt_options_are_refused_in_one_line(overrides, message):
    values = {"data": RECORDS, "out": "x", "method": "cpt", **overrides}
    with pytest.raises(OptionError, match=message):
        TrainConfig(**values)


def test_a_context_longer_than_the_model_s_is_refused(tmp_path):
    long = [{"instruction": "q" * 120, "output": "a"} for _ in range(8)]
    with pytest.raises(DataError, match=r"--method cpt: the context of 6 examples is \d+ tokens, which leaves no room"):
        train(config(tmp_path, trainable_base(), data=long, method="cpt", init=None, cpt_examples=6))


def test_build_prompt_points_to_the_context_constructor():
    with pytest.raises(ValueError, match="a CPT prompt is made from its context's tokens"):
        build_prompt(trainable_base(), "cpt")
    with pytest.raises(ValueError, match="unknown CPT loss 'sum'"):
        ContextPrompt(torch.zeros(2, 4), [1, 2], [1, 4], loss="sum")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cpt-epsilon", "-1"], "--cpt-epsilon must be >= 0, got -1"),
        (["--cpt-examples", "0"], "--cpt-examples must be >= 1, got 0"),
        (["--cpt-format-epsilon", "101"], "--cpt-format-epsilon must be <= 100, got 101"),
    ],
)
def test_the_cli_refuses_cpt_options_out_of_range(capsys, tmp_path, argv, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--method", "cpt", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == f"softprompt train: error: {message}"


def test_the_demo_runs_with_cpt(tmp_path):
    from helpers import tiny_base

    from softprompt import run_demo

    lines = []
    results = run_demo(
        tmp_path / "demo",
        tiny_base(),
        print_fn=lines.append,
        steps=2,
        batch_size=4,
        method="cpt",
        examples=1,
        progress=False,
    )
    adapter = load_adapter(tmp_path / "demo")
    assert results["method"] == "cpt" and adapter.method == "cpt"
    assert adapter.num_virtual_tokens == len(adapter.config["cpt_token_ids"])
    assert any("CPT (context-aware prompt tuning)" in line for line in lines)
