"""Tasks, splits, partitions (flwr-datasets) and answer-only batches; a site's own rows checked
against the server's task."""

import dataclasses
import json

import pytest

from privlora import builtin_task, data
from privlora.config import DataConfig
from privlora.data import (
    PAD_MULTIPLE,
    collate,
    load_task,
    partition,
    read_jsonl,
    read_rows,
    render_prompt,
    site_rows,
    split,
    tokenize,
)
from privlora.errors import ConfigError, DataError
from privlora.privacy.plan import check_site


def test_builtin_task_is_balanced_distinct_and_seeded():
    rows = builtin_task.generate(400, seed=3)
    assert rows == builtin_task.generate(400, seed=3)
    assert rows != builtin_task.generate(400, seed=4)
    assert len({r["text"] for r in rows}) == 400
    counts = {label: sum(r["label"] == label for r in rows) for label in builtin_task.TEAMS.values()}
    assert set(counts.values()) == {100}


def test_builtin_task_varies_beyond_templates():
    rows = builtin_task.generate(2000, seed=0)
    # Far more distinct tickets than intent templates: slot values, openings and asides vary.
    templates = sum(len(v) for v in builtin_task._INTENTS.values())
    assert len({r["text"] for r in rows}) > 50 * templates


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_classification_task_discovers_labels(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": ["a", "b", "c"][i % 3]}
                                         for i in range(30)])
    task = load_task(DataConfig(path=str(path)), seed=0)
    assert task.kind == "classification" and task.labels == ("a", "b", "c")
    train, evaluation = split(task, 0.2, 100, seed=0)
    assert len(train) == 24 and len(evaluation) == 6
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}


def test_a_fixed_eval_file_is_the_eval_set_and_every_row_trains(tmp_path):
    path = _write(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]}
                                             for i in range(20)])
    held = _write(tmp_path / "val.jsonl", [{"text": f"v{i}", "label": "ab"[i % 2]}
                                           for i in range(8)])
    task = load_task(DataConfig(path=str(path), eval_path=str(held)), seed=0)
    train, evaluation = split(task, 0.2, 5, seed=0)
    assert len(train) == 20 and [r["text"] for r in evaluation] == [f"v{i}" for i in range(5)]
    other = _write(tmp_path / "bad_val.jsonl", [{"text": "v", "label": "c"}])
    with pytest.raises(DataError, match=r"labels \['c'\] do not occur"):
        load_task(DataConfig(path=str(path), eval_path=str(other)), seed=0)


def test_text_fields_make_classification_rows_from_other_fields(tmp_path):
    # PubMedQA's shape: the question and its abstract make the text, the answer is the label
    rows = [{"question": f"q{i}?", "context": f"abstract {i}.", "answer": ["yes", "no", "maybe"][i % 3],
             "pmid": str(i)} for i in range(12)]
    path = _write(tmp_path / "pqa.jsonl", rows)
    config = DataConfig(path=str(path), text_fields=("question", "context"), label_field="answer")
    task = load_task(config, seed=0)
    assert task.kind == "classification" and task.labels == ("maybe", "no", "yes")
    assert task.rows[4]["text"] == "Question: q4?\n\nContext: abstract 4."
    assert task.rows[4]["label"] == "no"
    # rows written out as they are (flower local's sites) read back to the same text
    again = _write(tmp_path / "site.jsonl", list(task.rows))
    assert [r["text"] for r in site_rows(again, task, config)] == [r["text"] for r in task.rows]
    assert read_rows(path, DataConfig(path=str(path))) == rows  # no text_fields: as stored
    rows[7].pop("context")
    _write(path, rows)
    with pytest.raises(DataError, match=r"row 8 lacks \['context'\]"):
        load_task(config, seed=0)


def test_generation_task(tmp_path):
    path = _write(tmp_path / "g.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)])
    assert load_task(DataConfig(path=str(path)), seed=0).kind == "generation"


def test_partitions_iid_and_dirichlet():
    rows = builtin_task.generate(400, seed=0)
    iid = partition(rows, DataConfig(partition="iid"), 4, seed=0)
    assert sorted(len(p) for p in iid) == [100] * 4
    assert sorted(r["text"] for p in iid for r in p) == sorted(r["text"] for r in rows)
    skewed = partition(rows, DataConfig(partition="dirichlet", dirichlet_alpha=0.1), 4, seed=0)
    assert sum(len(p) for p in skewed) == 400
    shares = [max(sum(r["label"] == lab for r in p) for lab in ["red", "blue", "green", "amber"])
              / len(p) for p in skewed]
    assert max(shares) > 0.5  # alpha = 0.1 concentrates labels; IID would give ~0.25


def test_bad_data_files_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        read_jsonl(tmp_path / "bad.jsonl")
    path = _write(tmp_path / "nolabel.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(DataError, match="row 2"):
        load_task(DataConfig(path=str(path)), seed=0)


def test_fewer_examples_than_clients():
    with pytest.raises(DataError, match="num_clients"):
        partition(builtin_task.generate(20, 0)[:3], DataConfig(), 4, seed=0)


def test_batches_mark_only_answer_positions(tokenizer):
    task = load_task(DataConfig(builtin_examples=40), seed=0)
    examples = tokenize(list(task.rows[:4]), task, tokenizer, max_length=128)
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch.input_ids.shape[1] % PAD_MULTIPLE == 0
    assert batch.input_ids.shape[1] - max(len(e.prompt) + len(e.answer) for e in examples) < 8
    for b, e in enumerate(examples):
        # positions marked predict exactly the answer tokens (label word + end of turn)
        assert batch.targets[b][batch.target_mask[b]].tolist() == list(e.answer)
        assert tokenizer.decode(e.answer[:-1]) == e.label


def test_long_texts_are_cut_to_fit(tokenizer):
    task = load_task(DataConfig(builtin_examples=20), seed=0)
    rows = [{"text": "word " * 500, "label": "red"}]
    (example,) = tokenize(rows, task, tokenizer, max_length=64)
    assert len(example.prompt) + len(example.answer) <= 64 + 2
    assert example.answer[-1] == tokenizer.eos_token_id



def test_the_instruction_is_the_system_message_and_a_refusing_template_falls_back(tokenizer):
    import copy

    task = load_task(DataConfig(), seed=0)
    ids = render_prompt(task, "My bill is wrong.", tokenizer)
    text = tokenizer.decode(ids)
    assert "SmolLM" not in text  # no default system prompt paid for by every example
    assert text.index(task.instruction) < text.index("My bill is wrong.")
    refusing = copy.deepcopy(tokenizer)
    refusing.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                              "{{ raise_exception('no system role') }}{% endif %}"
                              "{{ m['content'] }}{% endfor %}")
    fallback = refusing.decode(render_prompt(task, "My bill is wrong.", refusing))
    assert fallback.startswith(task.instruction) and fallback.endswith("My bill is wrong.")


def test_a_task_description_from_an_older_run_or_a_broken_file():
    task = data.Task("t", "classification", "Classify.", ("neg", "pos"), ())
    older = {"task": "t", "kind": "classification", "instruction": "Classify.",
             "labels": ["neg", "pos"], "model": "builtin"}  # adapter/task.json before the rename
    assert data.task_from_meta(older) == task
    with pytest.raises(DataError, match="lacks instruction, labels"):
        data.task_from_meta({"name": "t", "kind": "classification"})
    with pytest.raises(DataError, match="a JSON list, not an object"):
        data.task_from_meta(["t"])


def test_a_site_checks_its_own_rows_against_the_servers_task(tmp_path, tiny_config):
    task = data.Task("t", "classification", "Classify.", ("neg", "pos"), ())
    assert data.task_from_meta(json.loads(json.dumps(data.task_meta(task)))) == task
    path = tmp_path / "site.jsonl"
    path.write_text('{"text": "fine", "label": "pos"}\n{"text": "odd", "label": "meh"}\n')
    with pytest.raises(DataError, match=r"labels \['meh'\] are not among"):
        data.site_rows(path, task, tiny_config().data)
    path.write_text('{"text": "fine", "label": "pos"}\n{"text": "bad"}\n')
    with pytest.raises(DataError, match="row 2 lacks"):
        data.site_rows(path, task, tiny_config().data)
    config = tiny_config("privacy.mode=sample", "privacy.noise_multiplier=1",
                         "privacy.sample_rate=0.5", "train.batch_size=4")
    check_site(config, 32)  # expected batch 16 <= 4 x 4
    with pytest.raises(ConfigError, match="expected batch of 50"):
        check_site(config, 100)
    with pytest.raises(ConfigError, match="privacy.delta"):
        check_site(dataclasses.replace(config, privacy=dataclasses.replace(
            config.privacy, delta=0.5)), 32)
