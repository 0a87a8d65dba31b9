"""Domain pre-training: the text is the training split only, in time order, in windows that
cover every interaction; the stage trains, caches, and the finetune starts from its model."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from recranker_jax.cli import main
from recranker_jax.config import load_config
from recranker_jax.errors import RecRankerError
from recranker_jax.prompts.pretraining import pretraining_documents, windows
from tests.helpers import synthetic_split


@pytest.mark.parametrize("count, window, stride", [(0, 5, 2), (1, 5, 2), (5, 5, 2), (6, 5, 2), (17, 5, 5), (17, 6, 4),
                                                   (40, 50, 25), (130, 50, 25)])
def test_windows_cover_every_item_within_the_window_and_stride(count, window, stride):
    spans = windows(count, window, stride)
    covered = np.zeros(count, int)
    for start, end in spans:
        assert 0 <= start < end <= count and end - start <= window
        covered[start:end] += 1
    assert covered.all() or count == 0
    starts = [s for s, _ in spans]
    assert starts == sorted(starts) and all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_pretraining_text_is_each_users_training_history_in_time_order_without_held_out_items(tmp_path):
    data = synthetic_split(tmp_path)
    prompts = load_config("quickstart").prompts
    documents = pretraining_documents(data, prompts, "movie", window=6, stride=3)
    seen: dict[int, list[int]] = {}
    for user, items, text in documents:
        assert data.valid_item[user] not in items and data.test_item[user] not in items  # no leakage
        lines = text.splitlines()
        assert lines[0] == "The user's rated movies:" and len(lines) == len(items) + 1 <= 7
        for item, line in zip(items, lines[1:]):
            assert line.startswith(f'"Movie {data.items["item_id"].iloc[item]}": ')
        seen.setdefault(user, []).extend(items)
    for user in range(data.n_users):
        rows = np.flatnonzero(data.train_user == user)
        assert list(dict.fromkeys(seen.get(user, []))) == data.train_item[rows].tolist()  # all of them, in order
        assert np.all(np.diff(data.train_timestamp[rows]) >= 0)
        rating = {int(i): r for i, r in zip(data.train_item[rows], data.train_rating[rows])}
        first = next(text for u, _, text in documents if u == user).splitlines()[1]
        assert first.endswith(f": {int(np.floor(rating[int(data.train_item[rows[0]])] + 0.5))}")


SMALL = ["retrieval.epochs=2", "retrieval.eval_every=1", "retrieval.dim=8", "retrieval.models=[lightgcn]", "prompts.hints=false",
         "sampling.size=40", "prompts.tokenizer_vocab_size=500", "model.hidden_size=16", "model.intermediate_size=32",
         "train.batch_size=8", "pretrain.enabled=true", "pretrain.steps=3", "pretrain.batch_size=8",
         "pretrain.window_items=20", "pretrain.stride_items=20"]


def test_pretrain_trains_the_model_the_finetune_starts_from(tmp_path, capsys):
    root = [f"run.root={tmp_path}", *SMALL]
    assert main(["finetune", *root, "train.enabled=false"]) == 0  # the zero-shot path: no instruction tuning
    run = tmp_path / "quickstart"
    summary = json.loads((run / "pretrain" / "summary.json").read_text())
    assert summary["enabled"] and summary["steps"] == 3 and summary["users"] == 664
    pretrained = load_file(run / "pretrain" / "model" / "model.safetensors")
    tuned = load_file(run / "finetune" / "model" / "model.safetensors")
    assert pretrained.keys() == tuned.keys() and all(np.array_equal(pretrained[k], tuned[k]) for k in pretrained)
    assert not (run / "finetune" / "train_log.jsonl").exists()

    assert main(["finetune", "--rebuild", *root, "train.steps=2"]) == 0  # instruction tuning moves every weight
    assert "[finetune] done" in capsys.readouterr().out
    assert json.loads((run / "finetune" / "summary.json").read_text())["pretrained"]
    tuned = load_file(run / "finetune" / "model" / "model.safetensors")
    assert not np.array_equal(pretrained["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])

    assert main(["pretrain", *root, "pretrain.enabled=false", "run.rebuild=true"]) == 0
    assert "[pretrain] done: off" in capsys.readouterr().out
    assert not (run / "pretrain" / "model").exists()


def test_a_window_longer_than_the_sequence_is_one_line_naming_the_keys(tmp_path, capsys):
    assert main(["pretrain", f"run.root={tmp_path}", *SMALL, "pretrain.window_items=1000",
                 "pretrain.stride_items=1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: pretrain.window_items=1000: a pre-training window is ") and "train.seq_len=1152" in err


@pytest.mark.parametrize("override, message", [
    ("pretrain.window_items=1", "pretrain.window_items=1: expected at least 2"),
    ("pretrain.stride_items=60", "pretrain.stride_items=60: expected at most pretrain.window_items=50"),
    ("pretrain.steps=0", "pretrain.steps=0: expected a positive integer"),
])
def test_pretrain_settings_are_checked_at_load(override, message):
    with pytest.raises(RecRankerError, match=message):
        load_config("quickstart", [override])
