"""`softprompt eval`: does a soft prompt help? Loss, perplexity, accuracy, exact match and ROUGE-L, base vs adapters.

For every evaluated model (the base model and/or each adapter), batched:
- loss and perplexity on the answer tokens (answer + EOS, exactly the tokens training learns), via forward.label_nll;
- with `choices`: rank classification — for each record and each choice, the NLL of the choice's *full* token
  sequence (+ EOS) after the templated prompt; the lowest wins. Each record's prompt runs once and all its choices
  are scored from its keys/values (scoring.nll_per_group: the same scores as one full sequence per choice). Plus
  exact match of the greedy answer;
- without choices: exact match and ROUGE-L (rouge.py) of greedy answers from the generation engine, and the share
  of them stuck in a repetition loop (`looping`: the answer ran to --max-new-tokens and its last 32 tokens repeat
  one block of 1 to 16 tokens; inference/sampling.is_looping). --repetition-penalty / --no-repeat-ngram-size change
  how those answers are decoded (the same code as generate, chat and serve).

An adapter is always evaluated with the template saved in it, so training and evaluation format records the same
way. The base model uses `template` (default: the first adapter's template, so base and adapter see the same text).
Adapters of every method (prompt, prefix, ptuning) can be evaluated side by side; each result names its method.

Without `choices`, an adapter's saved label words (train saves them for classification-like data) become the
choices when every record's answer is one of them; the report says so in `notes` and `choices_from`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from softprompt.core.models import FrozenModel, load_base
from softprompt.data import batching
from softprompt.data.records import DataError, Fields, Record, assign_tasks, load_records, parse_words
from softprompt.data.templates import Template, encode_example, encode_text
from softprompt.evaluation.config import DEFAULT_MAX_NEW_TOKENS, EvalConfig
from softprompt.evaluation.rouge import exact_match, rouge_l
from softprompt.formats.adapter import Adapter, AdapterError, with_task
from softprompt.formats.compose import load_spec
from softprompt.inference.batch import GenerationRequest, GenerationResult
from softprompt.inference.engine import Engine
from softprompt.inference.sampling import is_looping
from softprompt.training.scoring import nll_per_example, nll_per_group


def load_eval_records(
    data,
    fields=None,
    label_field: str | None = None,
    label_words: list[str] | None = None,
    limit: int | None = None,
    skip_bad: bool = False,
    task_field: str | None = None,
) -> tuple[list[Record], list[str]]:
    """Records as training reads them (data.load_records), plus the skipped ones ('where: why') with `skip_bad`;
    `label_field` maps integer labels to `label_words`; `task_field` gives each record its task value."""
    fields, mapping = Fields.with_labels(
        fields, label_field, label_words, "--choices (or an adapter saved with label words)"
    )
    loaded = load_records(data, fields, mapping, skip_bad=skip_bad, limit=limit, task_field=task_field)
    return loaded.items, loaded.skipped


def _encode(template: Template, tokenizer, record: Record, output: str, max_length: int) -> batching.Example:
    try:
        ids, labels, cut = encode_example(template, tokenizer, record.instruction, record.input, output, max_length)
    except ValueError as err:
        raise DataError(f"{record.where}: {err}; raise --max-length or shorten the record") from err
    if cut:
        raise DataError(f"{record.where}: prompt + answer {output!r} is longer than --max-length {max_length}")
    return batching.Example(ids, labels, record.where)


def score_model(
    base: FrozenModel,
    adapter: Adapter | None,
    template: Template,
    records: list[Record],
    choices: list[str] | None,
    generations: list[str] | None,
    batch_size: int,
    max_batch_tokens: int,
    max_length: int,
    progress: bool = False,
    tasks: list[int] | None = None,
) -> dict:
    """Metrics of one model (the base when `adapter` is None) on `records`; `generations`: its greedy answers;
    `tasks`: each record's task, for a multitask adapter (each task's records are scored with its prompt)."""
    tok = base.tokenizer
    prompt = adapter.virtual(base.device) if adapter is not None and tasks is None else None
    if choices:
        # The gold answer is one of the choices, so its (record, choice) pair also gives the loss.
        examples = [_encode(template, tok, r, c, max_length) for r in records for c in choices]
    else:
        examples = [_encode(template, tok, r, r.output, max_length) for r in records]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc="score", unit="seq", leave=False)

    def scores(prompt, examples):
        if choices:
            return nll_per_group(
                base.model, prompt, examples, len(choices), tok.pad_token_id, max_batch_tokens, batch_size, bar
            )
        return nll_per_example(base.model, prompt, examples, tok.pad_token_id, max_batch_tokens, batch_size, bar)

    if tasks is None:
        nll, counts = scores(prompt, examples)
    else:  # each task's records (all their choices) on that task's prompt
        nll, counts = torch.zeros(len(examples), dtype=torch.float64), torch.zeros(len(examples), dtype=torch.long)
        per = len(choices) if choices else 1
        for task in sorted(set(tasks)):
            rows = [i * per + j for i, t in enumerate(tasks) if t == task for j in range(per)]
            part = adapter.for_task(task).virtual(base.device)
            nll[rows], counts[rows] = scores(part, [examples[i] for i in rows])
    if bar is not None:
        bar.close()
    predicted = None
    if choices:
        gold = torch.tensor([choices.index(r.output) for r in records])
        scores = nll.view(len(records), len(choices))
        rows = torch.arange(len(records))
        nll, counts = scores[rows, gold], counts.view(len(records), len(choices))[rows, gold]
        predicted = [choices[i] for i in scores.argmin(dim=1).tolist()]
    loss = float(nll.sum() / counts.sum())
    result = {"n": len(records), "loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if choices:
        result["accuracy"] = sum(choices[g] == p for g, p in zip(gold.tolist(), predicted)) / len(records)
        result["predicted_counts"] = {c: predicted.count(c) for c in choices}
    if generations is not None:
        result["exact_match"] = sum(exact_match(g, r.output) for g, r in zip(generations, records)) / len(records)
        if not choices:
            result["rouge_l"] = sum(rouge_l(g, r.output) for g, r in zip(generations, records)) / len(records)
    result["examples"] = [
        {
            "where": r.where,
            "instruction": r.instruction,
            "input": r.input,
            "output": r.output,
            **({"task": tasks[i]} if tasks is not None else {}),
            **({"choice": predicted[i]} if predicted else {}),
            **({"generation": generations[i]} if generations is not None else {}),
        }
        for i, r in enumerate(records)
    ]
    return result


def evaluate(config: EvalConfig) -> dict:
    """Evaluate the base model (when `compare_base` or no adapters are given) and each adapter on `config.data` (a
    path or a list of dicts). Returns a JSON-ready dict whose `results` holds one entry per model, each with
    `adapter` (None for the base), `n`, `loss`, `perplexity`, and `accuracy` (with choices), `exact_match`,
    `rouge_l` (without choices), `examples` (per record: gold, prediction). The keyword form is
    `softprompt.evaluate(data, model, adapters, **options)`."""
    # what the flags alone can get wrong fails before the model loads (seconds)
    choices = parse_words(config.choices, "--choices", minimum=2)
    Fields.parse(config.fields)
    if config.template:
        Template(config.template)
    base = (
        config.model
        if isinstance(config.model, FrozenModel)
        else load_base(config.model, device=config.device, dtype=config.dtype)
    )
    adapters = {str(path): load_spec(path, base) for path in config.adapters}  # 'a+b': a composition
    notes, choices_from = [], "--choices" if choices else None
    records, skipped = _records(config, choices, adapters)
    if not choices:
        choices, choices_from, note = _saved_choices(adapters, records)
        notes += [note] if note else []
    models, base_template = _models(config, adapters)
    tasks = _tasks(config, records, adapters)
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        longest = max((len(encode_text(base.tokenizer, c)) for c in choices), default=0) if choices else 0
        max_new_tokens = longest + 2 if choices else DEFAULT_MAX_NEW_TOKENS
    generations, gen_seconds = {}, {}
    if max_new_tokens:
        penalties = {
            "repetition_penalty": config.repetition_penalty,
            "no_repeat_ngram_size": config.no_repeat_ngram_size,
        }
        generations, gen_seconds = _generate(
            base, base_template, models, records, max_new_tokens, config.batch_size, config.progress, penalties, tasks
        )
    results = []
    for name, adapter, template in models:
        start = time.perf_counter()
        answers = generations.get(name)
        texts = [a.text.strip() for a in answers] if answers is not None else None
        metrics = score_model(
            base,
            adapter,
            template,
            records,
            choices,
            texts,
            config.batch_size,
            config.max_batch_tokens,
            _length_limit(config, base, adapter),
            config.progress,
            tasks.get(name),
        )
        if answers is not None and not choices:  # choice answers are a few tokens long: they cannot loop
            metrics = {
                **{k: v for k, v in metrics.items() if k != "examples"},
                "looping": loop_share(answers),
                "examples": metrics["examples"],
            }
        results.append(
            {
                "adapter": name,
                "method": adapter.method if adapter is not None else None,
                "template": template.spec,
                **metrics,
                "seconds": round(time.perf_counter() - start + gen_seconds.get(name, 0.0), 2),
            }
        )
    source = config.data if isinstance(config.data, (str, Path)) else "<records>"
    return {
        "data": str(source),
        "model": base.name,
        "n": len(records),
        "choices": choices,
        "choices_from": choices_from,
        "notes": notes,
        "max_new_tokens": max_new_tokens,
        "skipped": skipped,
        "results": results,
    }


def _length_limit(config: EvalConfig, base: FrozenModel, adapter: Adapter | None) -> int:
    """--max-length, or the model's context less the adapter's virtual tokens (no context known: 2048)."""
    if config.max_length is not None:
        return config.max_length
    context = getattr(base.model.config, "max_position_embeddings", None) or FALLBACK_CONTEXT
    return max(2, context - (adapter.num_virtual_tokens if adapter is not None else 0))


FALLBACK_CONTEXT = 2048  # a model config without max_position_embeddings


def _saved_choices(
    adapters: dict[str, Adapter], records: list[Record]
) -> tuple[list[str] | None, str | None, str | None]:
    """(choices, where from, a note for the report) when no --choices were given: the first adapter's saved label
    words, if every record's answer is one of them."""
    name, words = next(
        ((n, a.label_words) for n, a in adapters.items() if a.label_words and len(a.label_words) >= 2), (None, None)
    )
    if not words:
        return None, None, None
    outside = next((r for r in records if r.output not in words), None)
    if outside is not None:
        return (
            None,
            None,
            (
                f"not ranking {name}'s saved label words ({', '.join(words)}) as choices: "
                f"{outside.where} answers {outside.output!r}, which is not one of them"
            ),
        )
    return (
        list(words),
        f"label words saved with {name}",
        (f"choices: {', '.join(words)} (the label words saved with {name}; --choices overrides)"),
    )


def _records(
    config: EvalConfig, choices: list[str] | None, adapters: dict[str, Adapter]
) -> tuple[list[Record], list[str]]:
    """The evaluation records (labels mapped to --choices or an adapter's saved label words) and the skipped ones."""
    label_words = choices or next((a.label_words for a in adapters.values() if a.label_words), None)
    records, skipped = load_eval_records(
        config.data, config.fields, config.label_field, label_words, config.limit, config.skip_bad, config.task_field
    )
    for r in records if choices else ():
        if r.output not in choices:
            raise DataError(f"{r.where}: the answer {r.output!r} is not one of the choices {choices}")
    return records, skipped


def _tasks(config: EvalConfig, records: list[Record], adapters: dict[str, Adapter]) -> dict[str, list[int]]:
    """Each record's task for every multitask adapter (--task, or --task-field: integer ids, or names the adapter
    saved in training); one line naming the record and field, or the adapter, when one does not fit."""
    multitask = {name: a for name, a in adapters.items() if a.method == "multitask"}
    if not multitask:
        if config.task is not None or config.task_field is not None:
            raise ValueError("--task and --task-field are for multitask adapters (no --adapter is one)")
        return {}
    if config.task is None and config.task_field is None:
        name, adapter = next(iter(multitask.items()))
        raise AdapterError(
            f"--adapter {name}: a multitask adapter needs --task-field FIELD (each record's task) or --task ID "
            f"(tasks 0..{adapter.num_tasks - 1})"
        )
    raw = [r.task for r in records]
    out = {}
    for name, adapter in multitask.items():
        if config.task is not None:
            adapter.for_task(config.task, where=f"--adapter {name}")  # refused unless the adapter has the task
            out[name] = [config.task] * len(records)
            continue
        for record, value in zip(records, raw):
            record.task = value
        names = adapter.extra.get("task_names") if isinstance(adapter.extra.get("task_names"), list) else None
        assign_tasks(records, config.task_field, adapter.num_tasks, names, limit=f"adapter {name} has")
        out[name] = [r.task for r in records]
    return out


def _models(
    config: EvalConfig, adapters: dict[str, Adapter]
) -> tuple[list[tuple[str | None, Adapter | None, Template]], Template]:
    """(name, adapter, template) of each model to evaluate, the base model first, and the base model's template:
    --template, else the first adapter's, so base and adapter see the same text. Adapters use their saved one."""
    first = next(iter(adapters.values()), None)
    base_template = (
        Template(config.template) if config.template else (first.template_or(Template()) if first else Template())
    )
    models: list[tuple[str | None, Adapter | None, Template]] = []
    if config.compare_base or not adapters:
        models.append((None, None, base_template))
    return models + [(name, a, a.template_or(Template())) for name, a in adapters.items()], base_template


def _generate(
    base: FrozenModel,
    base_template: Template,
    models,
    records: list[Record],
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
    penalties: dict,
    tasks: dict[str, list[int]] | None = None,
) -> tuple[dict, dict]:
    """Greedy answers of every model and the seconds each took; one Engine, so each adapter's soft-prompt KV is
    computed once."""
    engine = Engine(base, {name: a for name, a, _ in models if a is not None}, default_template=base_template)
    out, seconds = {}, {}
    for name, _, _ in models:
        start = time.perf_counter()
        ids = (tasks or {}).get(name) or [None] * len(records)  # a multitask adapter's rows: NAME@TASK
        requests = [
            GenerationRequest(
                prompt_ids=engine.encode(r.instruction, r.input, name),
                adapter=with_task(name, task),
                max_new_tokens=max_new_tokens,
                **penalties,
            )
            for r, task in zip(records, ids)
        ]
        out[name] = engine.generate(requests, batch_size=batch_size, progress=progress)
        seconds[name] = time.perf_counter() - start
    return out, seconds


def loop_share(answers: list[GenerationResult]) -> float:
    """The share of answers stuck in a repetition loop (sampling.is_looping: ran to the token limit and the last 32
    tokens repeat one block of at most 16 tokens)."""
    return sum(is_looping(a.token_ids, a.finish_reason == "length") for a in answers) / max(1, len(answers))


METRICS = [
    ("method", "method", "{}"),
    ("n", "n", "{:d}"),
    ("loss", "loss (answer tokens)", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("accuracy", "accuracy (rank classification)", "{:.1%}"),
    ("exact_match", "exact match (greedy)", "{:.1%}"),
    ("rouge_l", "ROUGE-L (greedy)", "{:.3f}"),
    ("looping", "stuck in a loop (greedy)", "{:.1%}"),
    ("seconds", "seconds", "{:.1f}"),
]


def model_label(result: dict) -> str:
    return "base" if result["adapter"] is None else str(result["adapter"])


def format_table(results: list[dict], labels: list[str] | None = None) -> str:
    """Metrics as rows, models side by side as columns."""
    labels = labels or [model_label(r) for r in results]
    rows = [
        [title] + [fmt.format(r[key]) if r.get(key) is not None else "-" for r in results]
        for key, title, fmt in METRICS
        if any(key in r for r in results)
    ]
    header = ["metric"] + labels
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in rows])


def _short(text, width: int = 160) -> str:
    shown = repr(text)
    return shown if len(shown) <= width else shown[: width - 4] + "...'"


def format_examples(results: list[dict], count: int, labels: list[str] | None = None) -> str:
    """A few records with each model's answer (greedy generation, else the ranked choice); long texts shortened."""
    labels = labels or [model_label(r) for r in results]
    lines = []
    for i in range(min(count, results[0]["n"] if results else 0)):
        ex = results[0]["examples"][i]
        question = ex["instruction"] + (f" | {ex['input']}" if ex["input"] else "")
        lines.append(f"[{Path(ex['where']).name}] {_short(question)[1:-1]}")
        lines.append(f"    expected: {_short(ex['output'])}")
        for label, r in zip(labels, results):
            e = r["examples"][i]
            answer = e.get("generation", e.get("choice"))
            lines.append(
                f"    {label}: {_short(answer)}"
                + (f" (ranked choice: {e['choice']})" if "generation" in e and "choice" in e else "")
            )
    return "\n".join(lines)
