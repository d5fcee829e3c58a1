"""CPT on the real embedded model, SmolLM2-135M-Instruct: a context of SST-2-like examples typed by softprompt, a
CPT prompt moved onto its bounds, saved; PEFT 0.21 loads the folder with softprompt's forward logits. Marked slow."""

import pytest
import torch
from helpers import text_logits

from softprompt.core.models import load_base
from softprompt.core.prompt import ContextPrompt
from softprompt.data import batching
from softprompt.data.context import encode_context
from softprompt.data.records import Record
from softprompt.data.templates import Template
from softprompt.formats.adapter import load_adapter, save_adapter

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")

TEMPLATE = Template("Review: {instruction}\nSentiment: ")
EXAMPLES = [
    Record("a gorgeous , witty , seductive movie", "", "positive", "f:1"),
    Record("the plot is nothing but boilerplate", "", "negative", "f:2"),
]


def test_a_cpt_folder_on_the_real_model_loads_in_peft_with_equal_logits(default_base, tmp_path):
    context = encode_context(EXAMPLES, default_base.tokenizer, TEMPLATE)
    assert set(context.type_mask) == {1, 2, 3, 4, 5, 6, 7, 8}
    module = ContextPrompt.from_tokens(
        default_base, context.token_ids, context.type_mask, loss="decay", decay_factor=0.9
    )
    with torch.no_grad():
        module.delta.copy_(torch.randn(module.delta.shape, generator=torch.Generator().manual_seed(0)))
        module.project_()  # every moving token on its bound: 0.1 x sqrt(576 / 2048) = 0.053
    assert torch.allclose(module.delta.norm(dim=1)[module.moves[:, 0] > 0], torch.tensor(0.1 * (576 / 2048) ** 0.5))
    save_adapter(tmp_path / "cpt", module, default_base, template=TEMPLATE)
    adapter = load_adapter(tmp_path / "cpt", default_base)
    rows = [Record("an utterly charming film", "", "positive", "r:1"), Record("dull", "", "negative", "r:2")]
    examples = batching.encode_records(rows, default_base.tokenizer, TEMPLATE, 256)[0]
    batch = batching.collate(examples, default_base.tokenizer.pad_token_id)
    n = adapter.num_virtual_tokens
    with torch.no_grad():
        ours = text_logits(default_base.model, adapter.virtual(), batch["input_ids"], batch["attention_mask"])
        wrapped = peft.PeftModel.from_pretrained(load_base(device="cpu", dtype="float32").model, str(tmp_path / "cpt"))
        theirs = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, n:]
    keep = batch["attention_mask"].bool()
    assert torch.allclose(ours[keep], theirs[keep], atol=1e-4), (ours[keep] - theirs[keep]).abs().max()
