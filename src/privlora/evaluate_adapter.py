"""Evaluate an adapter saved by ``privlora run``, loaded with stock ``PeftModel.from_pretrained``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from privlora import bounded_json, data, import_peft_without_bitsandbytes, quiet

import_peft_without_bitsandbytes()  # PEFT would import bitsandbytes (2 s) for layers never used

from peft import PeftModel

from privlora.config import DataConfig, load_config
from privlora.errors import ConfigError, DataError
from privlora.evaluate import evaluate
from privlora.models import load_model, load_tokenizer


def evaluate_adapter(adapter_dir: Path, data_path: str | None, model_name: str | None) -> dict:
    """Score the adapter on ``data_path`` (every row) or, by default, its run's eval split."""
    meta_file = adapter_dir / "task.json"
    if not (adapter_dir / "adapter_config.json").is_file() or not meta_file.is_file():
        raise ConfigError(f"--adapter {adapter_dir}: not an adapter saved by `privlora run` "
                          "(needs adapter_config.json and task.json); give a run's adapter/ dir")
    try:
        meta = bounded_json.loads(meta_file.read_text(encoding="utf-8"))
    except ValueError:  # not UTF-8, not JSON, or nested too deep
        raise ConfigError(f"{meta_file} is not JSON; it is not one `privlora run` wrote (rerun "
                          "the run, or restore the file from its run directory)") from None
    trained = data.task_from_meta(meta)
    run_config = adapter_dir.parent / "config.toml"
    config = load_config(run_config if run_config.is_file() else None)
    if data_path is None:
        if not run_config.is_file():
            raise ConfigError(f"no {run_config} to rebuild the eval split from; pass --data PATH")
        task = data.load_task(config.data, config.seed)
        _, rows = data.split(task, config.data.eval_fraction, config.data.max_eval, config.seed)
        source = f"eval split of {config.data.path}"
    else:
        rows = _checked_rows(Path(data_path), trained, config.data)
        source = data_path
    task = dataclasses.replace(trained, rows=tuple(rows))
    name = model_name or meta["model"]
    tokenizer = load_tokenizer(name)
    base = load_model(name, config.model.dtype, config.model.device)
    with quiet.peft_wrapping():
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    examples = data.tokenize(list(rows), task, tokenizer, meta["max_length"])
    result = evaluate(model, examples, task, tokenizer)
    return {"data": source, **result.published()}


def _checked_rows(path: Path, task: data.Task, config: DataConfig) -> list[dict]:
    rows = data.read_rows(path, config)
    fields, labels, classifies = task.fields, task.labels, task.classifies
    for number, row in enumerate(rows, start=1):
        missing = [f for f in fields if f not in row]
        if missing:
            raise DataError(f"{path}: row {number} lacks {missing}; this adapter needs {fields}")
        if classifies and str(row["label"]) not in labels:
            raise DataError(
                f"{path}: row {number} has label {row['label']!r}, unknown to this adapter "
                f"(trained on {list(labels)}); remove it or map it to a known label"
            )
    if classifies:
        rows = [{**r, "label": str(r["label"])} for r in rows]
    return rows
