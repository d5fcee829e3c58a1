"""A CPT adapter is served like prompt tuning: its prompt is its context's embeddings plus the trained delta, ordinary
input embeddings. generate, a batch file, chat and eval give a CPT folder the answers a PROMPT_TUNING folder with the
same tensor gets, greedy tokens equal a no-cache loop, and rows of a CPT adapter in a batch mixed with every other
method (and the base) equal the rows alone."""

import io

import pytest
import torch
from engine_helpers import peaked_base, reference_greedy

from softprompt import evaluate, generate, generate_batch
from softprompt.core.prompt import ContextPrompt, build_prompt
from softprompt.data.context import encode_context
from softprompt.data.records import Record
from softprompt.data.templates import Template, encode_text
from softprompt.formats.adapter import load_adapter, save_adapter
from softprompt.inference.batch import GenerationRequest
from softprompt.inference.chat import Conversation, chat_loop
from softprompt.inference.engine import Engine
from softprompt.inference.generate import add_adapter, build_engine

EXAMPLES = [Record("colour of the sky?", "", "blue", "f:1"), Record("colour of grass?", "", "green", "f:2")]


@pytest.fixture(scope="module")
def peaked():
    return peaked_base()


def cpt_module(base) -> ContextPrompt:
    """A CPT prompt over two examples whose deltas sit on their bounds."""
    context = encode_context(EXAMPLES, base.tokenizer, Template())
    module = ContextPrompt.from_tokens(base, context.token_ids, context.type_mask, epsilon=2.0, format_epsilon=1.0)
    with torch.no_grad():
        module.delta.copy_(torch.randn(module.delta.shape, generator=torch.Generator().manual_seed(1)) * 5)
        module.project_()
    return module


@pytest.fixture(scope="module")
def folders(peaked, tmp_path_factory):
    """OUT/cpt (a CPT folder), OUT/same (its tensor as prompt tuning) and one adapter of every other method."""
    out = tmp_path_factory.mktemp("cpt-adapters")
    module = cpt_module(peaked)
    save_adapter(out / "cpt", module, peaked, template=Template())
    save_adapter(out / "same", module().detach(), peaked, template=Template())
    for i, method in enumerate(["prompt", "prefix", "ptuning", "cartridge"]):
        other = build_prompt(peaked, method, "random", 3, seed=i)
        with torch.no_grad():
            tensor = other() + 0.5 * torch.randn(other().shape, generator=torch.Generator().manual_seed(i))
        save_adapter(out / method, tensor, peaked, method=method, template=Template())
    return out


def test_a_cpt_folder_is_input_embeddings_its_context_moved(peaked, folders):
    adapter = load_adapter(folders / "cpt", peaked)
    assert adapter.method == "cpt" and adapter.virtual().embeds_input
    assert torch.equal(adapter.embeddings, load_adapter(folders / "same", peaked).embeddings)
    table = peaked.model.get_input_embeddings().weight.detach()
    assert not torch.equal(adapter.embeddings, table[torch.tensor(adapter.config["cpt_token_ids"])])


def test_generate_and_a_batch_file_answer_as_for_prompt_tuning(peaked, folders):
    options = dict(base=peaked, greedy=True, max_new_tokens=8)
    answers = {name: generate("colour of snow?", adapter=str(folders / name), **options) for name in ("cpt", "same")}
    assert answers["cpt"] == answers["same"]
    assert answers["cpt"] != generate("colour of snow?", **options)  # the context matters
    adapter = load_adapter(folders / "cpt", peaked)
    ids = encode_text(peaked.tokenizer, Template().prompt("colour of snow?"))
    tokens, _ = reference_greedy(peaked, adapter.virtual(), ids, 8)
    assert answers["cpt"] == peaked.tokenizer.decode(tokens, skip_special_tokens=True)
    records = [{"instruction": t, "adapter": a} for t in ["hi", "colour of snow?"] for a in ["cpt", "same", None]]
    rows = generate_batch(records, base=peaked, adapters_dir=str(folders), greedy=True, max_new_tokens=6)
    assert rows[0]["output"] == rows[1]["output"] and rows[3]["output"] == rows[4]["output"]


def test_cpt_rows_in_a_batch_mixed_with_every_method_equal_rows_alone(peaked, folders):
    names = ["cpt", "prompt", "prefix", "ptuning", "cartridge"]
    engine = Engine(peaked, {n: load_adapter(folders / n, peaked) for n in names})
    texts = ["hello", "colour of snow?", "a b c d e"]
    requests = [
        GenerationRequest(encode_text(peaked.tokenizer, t), adapter=a, max_new_tokens=6)
        for t in texts
        for a in [None, *names]
    ]
    batched = engine.generate(requests, batch_size=9)
    for request, result in zip(requests, batched):
        alone = engine.generate(
            [GenerationRequest(request.prompt_ids, adapter=request.adapter, max_new_tokens=6)], batch_size=1
        )[0]
        assert result.token_ids == alone.token_ids, request.adapter
        if request.adapter == "cpt":
            virtual = load_adapter(folders / "cpt", peaked).virtual()
            assert result.token_ids == reference_greedy(peaked, virtual, request.prompt_ids, 6)[0]


def test_chat_with_a_cpt_adapter_equals_generate(peaked, folders):
    engine = build_engine(peaked)
    name = add_adapter(engine, folders / "cpt")
    conversation = Conversation(engine, name, {"temperature": 0.0, "top_k": 0, "top_p": 1.0}, 8)
    stdout = io.StringIO()
    assert chat_loop(conversation, io.StringIO("colour of snow?\n/quit\n"), stdout, io.StringIO()) == 0
    expected = generate("colour of snow?", base=peaked, adapter=str(folders / "cpt"), greedy=True, max_new_tokens=8)
    assert stdout.getvalue() == expected + "\n"


def test_eval_scores_a_cpt_adapter_as_prompt_tuning(peaked, folders):
    data = [{"instruction": f"colour {i}?", "output": ["blue", "green"][i % 2]} for i in range(6)]
    report = evaluate(
        data,
        model=peaked,
        adapters=[str(folders / "cpt"), str(folders / "same")],
        choices=["blue", "green"],
        max_new_tokens=4,
        progress=False,
    )
    cpt, same = report["results"]
    assert cpt["method"] == "cpt" and same["method"] == "prompt"
    for key in ("loss", "accuracy", "exact_match"):
        assert cpt[key] == same[key], key
