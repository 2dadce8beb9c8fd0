"""Tasks -> prompts -> token ids; train/eval split; partitions across clients (flwr-datasets).

A task is either classification (JSONL rows with ``text`` and ``label``; labels discovered from
the data; the target is the label word; ``data.text_fields`` builds the text from other fields)
or generation (rows with ``question`` and ``answer``).
Loss and scoring use only the answer tokens.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from privlora import bounded_json, builtin_task
from privlora.config import DataConfig
from privlora.errors import ConfigError, DataError

local_log = logging.getLogger("privlora.local")

TaskKind = Literal["classification", "generation"]


@dataclass(frozen=True)
class Task:
    """A named task: its kind, instruction, label words (classification) and raw rows."""

    name: str
    kind: TaskKind
    instruction: str
    labels: tuple[str, ...]
    rows: tuple[dict, ...]
    eval_rows: tuple[dict, ...] = ()  # a fixed eval set (data.eval_path); () = hold out from rows

    @property
    def classifies(self) -> bool:
        """Whether answers are label words (classification), not free text (generation)."""
        return self.kind == "classification"

    @property
    def fields(self) -> tuple[str, str]:
        """The two fields each row of this task holds."""
        return fields_of(self.kind)


# The general-text perplexity set is scored as a generation task with no instruction.
GENERAL_TEXT = Task("general text", "generation", "", (), ())


@dataclass(frozen=True)
class Example:
    """One tokenized example: prompt ids, answer ids (label/answer + end of turn), gold label."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    label: str | None


@dataclass(frozen=True)
class Batch:
    """A right-padded batch; ``target_mask[b, t]`` marks positions whose next token is an answer."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    target_mask: torch.Tensor  # (B, T) bool
    targets: torch.Tensor  # (B, T) next-token ids (valid where target_mask)

    def to(self, device: torch.device) -> Batch:
        """Return the batch on ``device`` (through pinned memory when it is a GPU)."""
        if device.type == "cpu":
            return self
        return Batch(*(t.pin_memory().to(device, non_blocking=True) for t in
                       (self.input_ids, self.attention_mask, self.target_mask, self.targets)))


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file; a missing, empty or malformed file raises DataError naming the line.

    Blank lines are skipped. No message quotes a line: rows are private data.
    """
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; give a JSONL path or 'builtin'")
    with contextlib.closing(_lines(path)) as lines:  # the file closes now, even on a refusal
        rows = [_parse_line(line, number, path) for number, line in lines]
    if not rows:
        raise DataError(f"data file {path} is empty; it needs one JSON object per line")
    return rows


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) for each non-blank line of a UTF-8 file (a leading BOM is
    dropped)."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: byte {err.start + 1} of the line is not UTF-8; "
                                "save the file as UTF-8") from None
            if line.strip():
                yield number, line


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null", dict: "an object"}


def _parse_line(line: str, number: int, path: Path) -> dict:
    try:
        row = bounded_json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); "
                        "fix that line") from None
    except bounded_json.TooDeep as err:
        raise DataError(f"{path}:{number}: {err}; fix that line (a row is one flat {{...}} "
                        "object)") from None
    except ValueError:  # a number of thousands of digits
        raise DataError(f"{path}:{number}: a number too long to read; fix that line") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{number}: {_JSON_KINDS[type(row)]}, not a JSON object; each "
                        "line must be one {...} row")
    return row


def _line_of(path: Path, row: int) -> int:
    """Return the file line that holds the ``row``-th row (1-based; blank lines hold none)."""
    return next(itertools.islice(_lines(path), row - 1, None))[0]


def _shown(value: object) -> str:
    """Return a short repr of a label or id for a message (never a long private text)."""
    text = str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def load_task(config: DataConfig, seed: int) -> Task:
    """Build the task named by ``data.path``: the generated built-in task or a JSONL file."""
    if config.path == "builtin":
        rows = builtin_task.generate(config.builtin_examples, seed)
        labels = tuple(sorted({r["label"] for r in rows}))
        return Task("builtin-ticket-routing", "classification", builtin_task.INSTRUCTION, labels,
                    tuple(rows))
    path = Path(config.path)
    rows = read_rows(path, config)
    kind = _detect_kind(rows[0], config.kind, path)
    _check_fields(rows, kind, path)
    eval_rows: list[dict] = []
    if config.eval_path:
        eval_rows = read_rows(Path(config.eval_path), config)
        _check_fields(eval_rows, kind, Path(config.eval_path))
    if kind == "generation":
        return Task(path.stem, kind, "", (), tuple(rows), tuple(eval_rows))
    labels = tuple(sorted({str(r["label"]) for r in rows}))
    if len(labels) < 2:
        raise DataError(f"{path}: only one label {_shown(labels[0])}; classification needs at "
                        "least two")
    _check_labels(eval_rows, labels, Path(config.eval_path),
                  f"do not occur in {path}; evaluate on data with the training labels")
    instruction = f"Classify the text. Answer with one word: {', '.join(labels)}."
    rows = [{**r, "label": str(r["label"])} for r in rows]
    eval_rows = [{**r, "label": str(r["label"])} for r in eval_rows]
    return Task(path.stem, kind, instruction, labels, tuple(rows), tuple(eval_rows))


def read_rows(path: Path, config: DataConfig) -> list[dict]:
    """Read a JSONL data file as task rows; with ``data.text_fields`` each row gains
    ``text`` ("Field: value" paragraphs) and ``label`` (``row[data.label_field]``). The row's
    own fields stay, so mapped rows written out (``privlora flower local``'s sites) map again
    to the same text."""
    rows = read_jsonl(path)
    _check_ids(rows, path)
    if not config.text_fields:
        return rows
    wanted = (*config.text_fields, config.label_field)
    mapped = []
    for number, row in enumerate(rows, start=1):
        missing = [f for f in wanted if row.get(f) in (None, "")]
        if missing:
            raise DataError(f"{path}:{_line_of(path, number)}: row {number} lacks {missing}; "
                            "data.text_fields and data.label_field name fields every row needs "
                            f"({list(wanted)})")
        text = "\n\n".join(f"{f.replace('_', ' ').capitalize()}: {row[f]}"
                            for f in config.text_fields)
        mapped.append({**row, "text": text, "label": str(row[config.label_field])})
    return mapped


def site_rows(path: Path, task: Task, config: DataConfig) -> list[dict]:
    """Read a deployed site's own training file for the server's ``task``: every row must have
    the task's fields (built as ``config.text_fields`` says), and a classification label must
    be one of the task's labels."""
    rows = read_rows(path, config)
    _check_fields(rows, task.kind, path)
    if not task.classifies:
        return rows
    _check_labels(rows, task.labels, path, "are not among the task's labels; a site trains on "
                  "the labels the server evaluates")
    return [{**r, "label": str(r["label"])} for r in rows]


def _check_labels(rows: list[dict], labels: tuple[str, ...], path: Path, why: str) -> None:
    """Refuse rows whose label is not one of ``labels``, naming the first one's line."""
    unknown = sorted({str(r["label"]) for r in rows} - set(labels))
    if not unknown:
        return
    first = next(n for n, r in enumerate(rows, start=1) if str(r["label"]) not in labels)
    raise DataError(f"{path}:{_line_of(path, first)}: labels {_listed(unknown, 5)} {why} "
                    f"{_listed(labels, 10)}")


def _listed(values: Sequence[str], most: int) -> str:
    """Return up to ``most`` values, shortened, as a list for a message."""
    more = ", ..." if len(values) > most else ""
    return f"[{', '.join(_shown(v) for v in values[:most])}{more}]"


def _check_ids(rows: list[dict], path: Path) -> None:
    """Refuse two rows with the same ``id``: one example twice would count twice in training
    and in what DP protects (a row's guarantee assumes it occurs once)."""
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        if "id" not in row:
            continue
        key = json.dumps(row["id"], sort_keys=True)
        if key in seen:
            raise DataError(f"{path}:{_line_of(path, number)}: id {_shown(row['id'])} repeats "
                            f"that of line {_line_of(path, seen[key])}; each row must be a "
                            "distinct example: remove the duplicate or give it its own id")
        seen[key] = number


def task_meta(task: Task) -> dict:
    """Return what defines the task, without its rows (what a deployed server tells the sites)."""
    return {"name": task.name, "kind": task.kind, "instruction": task.instruction,
            "labels": list(task.labels)}


def task_from_meta(meta: dict) -> Task:
    """Rebuild a row-less task from ``task_meta`` or a run's ``adapter/task.json`` (runs
    saved before 2026-12-06 named the task under ``"task"``: still read)."""
    if not isinstance(meta, dict):
        raise DataError(f"the task description is a JSON {type(meta).__name__}, not an object: "
                        "it is not one privlora wrote")
    if "name" not in meta and "task" in meta:
        meta = {**meta, "name": meta["task"]}
    missing = [k for k in ("name", "kind", "instruction", "labels") if k not in meta]
    if missing:
        raise DataError(f"the task description lacks {', '.join(missing)}: it is not one "
                        "privlora wrote (a run's adapter/task.json or a deployment's run config)")
    kind = meta["kind"]
    if kind not in ("classification", "generation"):
        raise DataError(f"task kind {kind!r} is neither classification nor generation")
    return Task(str(meta["name"]), kind, str(meta["instruction"]),
                tuple(str(x) for x in meta["labels"]), ())


def fields_of(kind: TaskKind) -> tuple[str, str]:
    """The two fields each row of a ``kind`` task holds."""
    return ("text", "label") if kind == "classification" else ("question", "answer")


def _check_fields(rows: list[dict], kind: TaskKind, path: Path) -> None:
    fields = fields_of(kind)
    for number, row in enumerate(rows, start=1):
        missing = [f for f in fields if f not in row or row[f] in (None, "")]
        if missing:
            raise DataError(f"{path}:{_line_of(path, number)}: row {number} lacks {missing}; "
                            f"every {kind} row needs {fields}")
        for name in fields:
            problem = _text_problem(row[name], name == "label")
            if problem:
                raise DataError(f"{path}:{_line_of(path, number)}: row {number} field {name!r} "
                                f"is {problem}; fix that row")


def _text_problem(value: object, label: bool) -> str | None:
    """Return what keeps ``value`` from being tokenized as a row's text (a label may also be a
    number or true/false), or None."""
    if label and isinstance(value, int | float | bool):
        return None
    if not isinstance(value, str):
        return f"{_JSON_KINDS.get(type(value), type(value).__name__)}, not a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800": no tokenizer takes it
        return "not valid Unicode (a lone \\u surrogate escape)"
    return None


def _detect_kind(row: dict, kind: str, path: Path) -> TaskKind:
    if kind != "auto":
        return kind  # type: ignore[return-value]
    if "text" in row and "label" in row:
        return "classification"
    if "question" in row and "answer" in row:
        return "generation"
    raise DataError(
        f"{path}:{_line_of(path, 1)} has fields {sorted(row)[:10]}; classification needs 'text' "
        "and 'label', generation needs 'question' and 'answer'"
    )


def held_out_count(rows: int, eval_fraction: float, max_eval: int) -> int:
    """How many of ``rows`` ``split`` holds out for eval when the task has no eval file."""
    return min(max_eval, max(1, round(rows * eval_fraction)))


def split(task: Task, eval_fraction: float, max_eval: int, seed: int) -> tuple[list, list]:
    """Shuffle with ``seed`` and split rows into (train, eval); eval capped at ``max_eval``.

    With a fixed eval set (``task.eval_rows``) every row trains and eval is its first max_eval.
    """
    rows = list(task.rows)
    random.Random(seed).shuffle(rows)
    if task.eval_rows:
        return rows, list(task.eval_rows[:max_eval])
    n_eval = held_out_count(len(rows), eval_fraction, max_eval)
    if len(rows) - n_eval < 1:
        raise DataError(f"{task.name}: {len(rows)} rows leave nothing to train on; add data")
    return rows[n_eval:], rows[:n_eval]


def partition(rows: list[dict], config: DataConfig, num_clients: int, seed: int) -> list[list[dict]]:
    """Split training rows across clients: IID or Dirichlet(alpha) over labels (flwr-datasets)."""
    # Why imported here: datasets + flwr-datasets (pandas, pyarrow) take about a second, which
    # a deployed site, a fresh process per Flower message, never needs
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if len(rows) < num_clients:
        raise DataError(
            f"{len(rows)} training examples cannot feed federation.num_clients = {num_clients}; "
            "use fewer clients or more data"
        )
    dataset = Dataset.from_list([{"index": i, "label": str(r.get("label", ""))}
                                 for i, r in enumerate(rows)])
    if config.partition == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
    else:
        if "label" not in rows[0]:
            raise DataError("data.partition = 'dirichlet' needs a 'label' field; use 'iid'")
        partitioner = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=config.dirichlet_alpha,
            min_partition_size=1, self_balancing=False, shuffle=True, seed=seed,
        )
    partitioner.dataset = dataset
    parts = [[rows[i] for i in partitioner.load_partition(k)["index"]] for k in range(num_clients)]
    empty = [k for k, p in enumerate(parts) if not p]
    if empty:
        raise DataError(f"clients {empty} got no examples; raise data.dirichlet_alpha or add data")
    return parts


def tokenize(rows: list[dict], task: Task, tokenizer: PreTrainedTokenizerBase,
             max_length: int) -> list[Example]:
    """Render rows as chat prompts and tokenize; long texts are cut so the answer always fits."""
    end = tokenizer.eos_token_id
    examples = []
    for row in rows:
        if task.classifies:
            text, answer, label = row["text"], row["label"], row["label"]
        else:
            text, answer, label = row["question"], row["answer"], None
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: max_length // 2]
        budget = max_length - len(answer_ids) - 1 - _prompt_overhead(task, tokenizer)
        text_ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
        if len(text_ids) > budget:
            text = tokenizer.decode(text_ids[: max(budget, 1)])
        prompt = render_prompt(task, str(text), tokenizer)
        examples.append(Example(tuple(prompt), tuple(answer_ids) + (end,), label))
    return examples


def render_prompt(task: Task, text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Return the chat-formatted prompt ids, ending where the assistant's answer begins.

    The task's instruction is the system message. Why: without one, chat templates such as
    SmolLM2's insert a default system prompt ("You are a helpful AI assistant named SmolLM...",
    20 tokens, 22% of a built-in ticket) that every forward and backward pays for and that says
    nothing about the task. A template that refuses a system role gets the instruction in the
    user turn instead.
    """
    content = f"{task.instruction}\n\n{text}" if task.instruction else text
    if not tokenizer.chat_template:
        return tokenizer(f"{content}\nAnswer: ", add_special_tokens=False)["input_ids"]
    if task.instruction:
        try:
            return _chat_ids(tokenizer, [{"role": "system", "content": task.instruction},
                                         {"role": "user", "content": text}])
        except TemplateError:  # e.g. a template that refuses a system role: one user turn
            local_log.info("chat template refused a system message; instruction in the user turn")
    return _chat_ids(tokenizer, [{"role": "user", "content": content}])


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _prompt_overhead(task: Task, tokenizer: PreTrainedTokenizerBase) -> int:
    return len(render_prompt(task, "", tokenizer))


PAD_MULTIPLE = 8
def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad prompt+answer sequences and mark the positions that predict answer tokens.

    Widths are rounded up to a multiple of 8 (vector-friendly). They used to be rounded to 32
    because oneDNN compiled a kernel per new shape; with eager attention on the CPU a new width
    costs nothing measurable, while 32 wasted a third of an FPB batch on padding.
    """
    seqs = [list(e.prompt) + list(e.answer) for e in examples]
    longest = max(len(s) for s in seqs)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    target_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    targets = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (e, seq) in enumerate(zip(examples, seqs)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention[b, : len(seq)] = 1
        start = len(e.prompt) - 1  # the last prompt position predicts the first answer token
        target_mask[b, start : start + len(e.answer)] = True
        targets[b, start : start + len(e.answer)] = torch.tensor(e.answer)
    return Batch(input_ids, attention, target_mask, targets)


def plain_texts(path: Path | str, what: str) -> Iterator[str]:
    """Yield the texts of a JSONL file in order (each row's ``text``, else its ``answer``),
    refusing a row that has neither; ``what`` names the file's role in the errors."""
    for number, row in enumerate(read_jsonl(Path(path)), start=1):
        text = row.get("text", row.get("answer"))
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: {what} needs a string field 'text' or 'answer' "
                            "per line")
        yield text


def general_texts(path: Path | str, count: int, tokenizer: PreTrainedTokenizerBase,
                  max_length: int) -> list[Example]:
    """Return up to ``count`` plain texts (the first rows' ``text``, else ``answer``) as examples
    whose every token after the first is scored: the general-text perplexity set.

    No chat template: this measures the language model itself, on text the fine-tune never saw.
    """
    examples = []
    for text in plain_texts(path, "general text"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        if len(ids) >= 2:
            examples.append(Example((ids[0],), tuple(ids[1:]), None))
        if len(examples) == count:
            break
    if not examples:
        raise DataError(f"{path}: no text of two tokens or more; give a JSONL of general text")
    return examples


def public_prompts(path: Path | str, count: int, task: Task,
                   tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Example]:
    """Return the first ``count`` public texts in the task's prompt, cut as ``tokenize`` cuts a
    row (their answer is a placeholder: only the scores at the answer's start are read)."""
    if not task.classifies:
        raise ConfigError(f"quantization.transfer = 'distill' fits the served adapter to the "
                          f"clients' label scores: a classification task's; this task is "
                          f"{task.kind!r}, use transfer = 'adapter' or 'logits'")
    texts = list(itertools.islice((t for t in plain_texts(path, "public text") if t.strip()),
                                  count))
    if not texts:
        raise DataError(f"{path}: no text in it; give a JSONL of public text (a 'text' per line)")
    return tokenize([{"text": t, "label": task.labels[0]} for t in texts], task, tokenizer,
                    max_length)
