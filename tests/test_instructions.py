import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recranker_jax.cli import main
from recranker_jax.config import load_config
from recranker_jax.errors import RecRankerError
from recranker_jax.prompts.render import RatingScale, quote
from recranker_jax.prompts.stage import build_instructions
from recranker_jax.prompts.tokenizer import encode_example
from recranker_jax.retrieval.stage import build_retrieval
from tests.helpers import synthetic_split

FAST_RETRIEVAL = ["retrieval.epochs=2", "retrieval.eval_every=1", "retrieval.dim=16", "retrieval.batch_size=512",
                  "retrieval.explicit_mf.epochs=2", "retrieval.explicit_mf.eval_every=1"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- a small real run


@pytest.fixture(scope="module")
def movielens_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    args = [f"run.root={root}", *FAST_RETRIEVAL, "sampling.size=300", "prompts.tokenizer_vocab_size=1024"]
    assert main(["instructions", *args]) == 0
    return root / "quickstart"


def answer_scale(rating: float) -> int:
    """Independent restatement of the default mapping: half stars rounded half up onto 1..5."""
    return int(min(max(np.floor(rating + 0.5), 1), 5))


def test_no_held_out_item_or_later_rating_reaches_any_prompt(movielens_run):
    data = movielens_run / "data"
    train = pd.read_csv(data / "train.csv", dtype=str)
    valid = pd.read_csv(data / "valid.csv", dtype=str).set_index("user_id")["item_id"]
    test = pd.read_csv(data / "test.csv", dtype=str).set_index("user_id")["item_id"]
    items = pd.read_csv(data / "items.csv", dtype=str, keep_default_na=False)
    quoted_to_ids: dict[str, set[str]] = {}
    for item_id, title in zip(items["item_id"], items["title"]):
        quoted_to_ids.setdefault(quote(title), set()).add(item_id)
    train_ratings: dict[str, dict[str, int]] = {}
    for user, item, rating in zip(train["user_id"], train["item_id"], train["rating"].astype(float)):
        train_ratings.setdefault(user, {})[item] = answer_scale(rating)
    records = read_jsonl(movielens_run / "instructions" / "train.jsonl")
    assert {r["task"] for r in records} == {"pointwise", "pairwise", "listwise"}
    line = re.compile(r'^("(?:[^"\\]|\\.)*"): (\d+)$')
    checked_ratings = 0
    for r in records:
        user = r["user_id"]
        held_out = {valid[user], test[user]}
        assert not held_out & set(r["item_ids"]), r
        # Every title shown belongs to an item listed in item_ids.
        for title in re.findall(r'"(?:[^"\\]|\\.)*"', r["prompt"]):
            assert quoted_to_ids[title] & set(r["item_ids"]), (title, r["task"])
        if r["task"] == "pointwise":
            # Every (title, rating) in the history is a training rating of this user, which by the
            # split's construction precedes the validation item; so is the answer.
            for title, rating in (m.groups() for m in map(line.match, r["prompt"].splitlines()) if m):
                assert any(train_ratings[user].get(i) == int(rating) for i in quoted_to_ids[title]), (user, title)
                checked_ratings += 1
            target = re.search(r'Target movie: ("(?:[^"\\]|\\.)*")', r["prompt"]).group(1)
            assert any(train_ratings[user].get(i) == int(r["response"]) for i in quoted_to_ids[target])
    assert checked_ratings > 1000


def test_inference_prompts_use_training_history_and_the_candidates_only(movielens_run):
    data = movielens_run / "data"
    train = pd.read_csv(data / "train.csv", dtype=str)
    train_items = train.groupby("user_id")["item_id"].apply(set)
    candidates = pd.read_csv(movielens_run / "retrieval" / "candidates.csv", dtype=str)
    candidate_lists = candidates.groupby("user_id")["item_id"].apply(list)
    records = read_jsonl(movielens_run / "instructions" / "test.jsonl")
    by_user: dict[str, list[dict]] = {}
    for r in records:
        by_user.setdefault(r["user_id"], []).append(r)
        assert set(r["item_ids"]) <= train_items[r["user_id"]] | set(candidate_lists[r["user_id"]])
        assert "response" not in r
    assert len(by_user) == 664
    user, prompts = next(iter(by_user.items()))
    shown = candidate_lists[user]
    point = [r for r in prompts if r["task"] == "pointwise"]
    assert [r["candidate"] for r in point] == shown
    prefix = point[0]["prompt"][: point[0]["prefix_chars"]]
    assert all(r["prompt"].startswith(prefix) and r["prompt"][r["prefix_chars"]:] == r["suffix"] for r in point)
    pairs = [tuple(r["pair"]) for r in prompts if r["task"] == "pairwise"]
    assert len(pairs) == 10 and sorted(x for p in pairs[::2] for x in p) == sorted(shown)  # 5 disjoint pairs
    assert all(pairs[2 * i + 1] == pairs[2 * i][::-1] for i in range(5))  # each asked in both orders
    (listwise,) = [r for r in prompts if r["task"] == "listwise"]
    assert sorted(listwise["candidates"]) == sorted(shown)


def test_pointwise_hints_are_the_explicit_mf_predictions(movielens_run):
    mf = np.load(movielens_run / "retrieval" / "explicit_mf.npz")
    data = movielens_run / "data"
    users = pd.read_csv(data / "test.csv", dtype=str)["user_id"].tolist()
    items = pd.read_csv(data / "items.csv", dtype=str, keep_default_na=False)["item_id"].tolist()
    record = next(r for r in read_jsonl(movielens_run / "instructions" / "test.jsonl") if r["task"] == "pointwise")
    u, i = users.index(record["user_id"]), items.index(record["candidate"])
    predicted = mf["mean_rating"] + mf["user_bias"][u] + mf["item_bias"][i] + mf["user_factors"][u] @ mf["item_factors"][i]
    shown = float(re.search(r"predicts a rating of (\d+\.\d)", record["prompt"]).group(1))
    assert shown == pytest.approx(min(max(predicted, 1.0), 5.0), abs=0.05)


def test_trained_tokenizer_loads_in_transformers_and_masks_the_answer(movielens_run):
    from transformers import PreTrainedTokenizerFast

    folder = movielens_run / "instructions" / "tokenizer"
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="</s>", bos_token="<s>")
    assert tokenizer.eos_token_id is not None
    record = read_jsonl(movielens_run / "instructions" / "train.jsonl")[0]
    ids, mask = encode_example(tokenizer, record["prompt"], record["response"])
    assert mask[0] == 0 and mask[-1] == 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[mask == 1][:-1]).strip() == record["response"]
    assert tokenizer.decode(ids[mask == 0], skip_special_tokens=True) == record["prompt"]


# ----------------------------------------------------------------------------- switches on a synthetic run


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic_split(root / "data")
    cfg = load_config("quickstart", [*FAST_RETRIEVAL, "retrieval.batch_size=64", "mesh.shape=[-1,1,1]"])
    build_retrieval(cfg, root / "data", _fresh(root / "retrieval"), root / "ckpt", progress=False)
    return root


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(root: Path, name: str, *overrides: str) -> tuple[dict, list[dict]]:
    cfg = load_config("quickstart", ["sampling.size=200", "sampling.clusters=4", "prompts.tokenizer_vocab_size=600", *overrides])
    out = _fresh(root / name)
    stats = build_instructions(cfg, root / "data", root / "retrieval", out)
    return stats, read_jsonl(out / "train.jsonl")


def test_ablation_switches_change_the_output(synthetic_run):
    stats, records = build(synthetic_run, "default")
    pairwise = [r["response"] for r in records if r["task"] == "pairwise"]
    n = len(pairwise)
    # Position shifting swaps each pair with probability 1/2: "No" count ~ Binomial(n, 1/2), 4 sigma.
    assert abs(pairwise.count("No") - n / 2) < 4 * np.sqrt(n / 4)
    assert all("Hint:" in r["prompt"] for r in records)
    assert set(stats["sampling"]["by_source"]) == {"importance", "cluster"}

    _, unshifted = build(synthetic_run, "no-shift", "prompts.position_shift=false")
    assert {r["response"] for r in unshifted if r["task"] == "pairwise"} == {"Yes"}
    _, no_hints = build(synthetic_run, "no-hints", "prompts.hints=false")
    assert not any("Hint:" in r["prompt"] for r in no_hints)
    uniform_stats, _ = build(synthetic_run, "uniform", "sampling.strategy=uniform")
    assert uniform_stats["sampling"]["by_source"] == {"uniform": 200}
    assert uniform_stats["train"]["by_task_and_source"]["pointwise"] == {"uniform": 200}


def test_history_budget_drops_the_oldest_items_and_counts_it(synthetic_run):
    from transformers import PreTrainedTokenizerFast

    stats, records = build(synthetic_run, "budget", "prompts.max_tokens=120", "prompts.tasks=[pointwise]",
                           "rank.methods=[pointwise]")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(synthetic_run / "budget" / "tokenizer" / "tokenizer.json"))
    truncated = [r for r in records if r["dropped_history"] > 0]
    assert stats["truncated_history"]["train"]["pointwise"] == len(truncated) > 0
    _, full = build(synthetic_run, "budget-free", "prompts.tasks=[pointwise]", "rank.methods=[pointwise]")
    for short, long in zip(records, full):
        assert short["response"] == long["response"]
        length = len(tokenizer(short["prompt"] + " " + short["response"])["input_ids"])
        if short["dropped_history"] == 0:
            assert short["prompt"] == long["prompt"]
        else:  # the question survives; the history kept is the most recent part of the full one
            history = lambda r: [l for l in r["prompt"].splitlines() if re.match(r'^".*": \d+$', l)]
            assert short["prompt"].splitlines()[-2:] == long["prompt"].splitlines()[-2:]
            assert history(short) == history(long)[short["dropped_history"]:]
        assert length <= 120 + 1  # +1: the BOS the budget check counts once


def test_a_budget_no_prompt_fits_even_without_history_is_an_error_naming_the_tokens_needed(synthetic_run):
    with pytest.raises(RecRankerError, match=r"prompts.max_tokens=20: \d+ prompts do not fit even with no history "
                                             r"\(the longest has (\d+) tokens without it\); set prompts.max_tokens "
                                             r"to at least \1$"):
        build(synthetic_run, "tiny-budget", "prompts.max_tokens=20", "prompts.tasks=[pointwise]", "rank.methods=[pointwise]")


def test_configuration_mistakes_are_one_line_errors(synthetic_run, tmp_path, capsys):
    with pytest.raises(RecRankerError, match=r"prompts.templates.pairwise_question: placeholder \{second\} is missing"):
        build(synthetic_run, "bad", "prompts.templates.pairwise_question=Prefer {first}? {hint}Answer:")
    with pytest.raises(RecRankerError, match=r"prompts.tasks=\['ranking'\]: expected a non-empty subset"):
        build(synthetic_run, "bad2", "prompts.tasks=[ranking]")
    assert main(["instructions", f"run.root={tmp_path}", "prompts.templates.listwise_hint=top: {best}"]) == 2
    assert "prompts.templates.listwise_hint: placeholder {ranked} is missing" in capsys.readouterr().err
    assert not (tmp_path / "quickstart" / "retrieval").exists()  # refused before any stage ran


def test_titles_are_quoted_and_ratings_mapped():
    assert quote('He said "hi"\nbye') == '"He said \\"hi\\" bye"'
    half = RatingScale(0.5, 5.0, "round")
    assert half.max_rating == 5 and list(half.to_answer([0.5, 2.5, 3.5, 4.5, 5.0])) == [1, 3, 4, 5, 5]
    doubled = RatingScale(0.5, 5.0, "double")
    assert doubled.max_rating == 10 and list(doubled.to_answer([0.5, 2.5, 4.5])) == [1, 5, 9]
    assert RatingScale(1.0, 10.0, "round").max_rating == 10  # BookCrossing
    assert half.hint(7.3) == "5.0" and doubled.hint(3.26) == "6.5"


def test_a_local_tokenizer_folder_is_used_instead_of_training_one(synthetic_run, tmp_path):
    trained_stats, _ = build(synthetic_run, "trained")
    folder = synthetic_run / "trained" / "tokenizer"
    stats, records = build(synthetic_run, "local", f"prompts.tokenizer={folder}")
    assert stats["tokenizer"] == str(folder) and not (synthetic_run / "local" / "tokenizer").exists()
    assert stats["vocab_size"] == trained_stats["vocab_size"] and len(records) > 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecRankerError, match=r"tokenizer folder .*empty: could not load a tokenizer"):
        build(synthetic_run, "broken", f"prompts.tokenizer={tmp_path / 'empty'}")
    with pytest.raises(RecRankerError, match=r"tokenizer folder .*missing not found"):
        build(synthetic_run, "missing", f"prompts.tokenizer={tmp_path / 'missing'}")


def test_finetune_stage_trains_and_exports_a_loadable_model(synthetic_run):
    import transformers

    from recranker_jax.llm.hf_import import load_hf_llama
    from recranker_jax.train.stage import build_finetune

    build(synthetic_run, "for-finetune")
    cfg = load_config("quickstart", ["sampling.size=200", "train.steps=8", "train.batch_size=8", "train.seq_len=256",
                                     "train.lr=1e-2", "train.warmup_steps=1", "model.hidden_size=32",
                                     "model.intermediate_size=64", "mesh.shape=[-1,1,1]"])
    out = _fresh(synthetic_run / "finetune")
    summary = build_finetune(cfg, synthetic_run / "for-finetune", out, synthetic_run / "ft-ckpt", progress=False)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 9))
    assert log[-1]["loss"] < log[0]["loss"]  # lr 1e-2 on a 2-layer model: the answer loss drops
    assert summary["answer_tokens"] > 0 and summary["examples"] == len(read_jsonl(synthetic_run / "for-finetune" / "train.jsonl"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model")
    reloaded = load_hf_llama(out / "model")
    assert reloaded.config.vocab_size == len(tokenizer)


def test_lora_finetune_trains_only_adapters_and_exports_them_for_peft(synthetic_run):
    from safetensors.numpy import load_file

    from recranker_jax.llm.hf_import import load_hf_llama
    from recranker_jax.train.stage import build_finetune, build_model

    build(synthetic_run, "for-lora")
    overrides = ["sampling.size=200", "train.steps=4", "train.batch_size=8", "train.seq_len=256", "train.lr=1e-2",
                 "train.warmup_steps=1", "model.hidden_size=32", "model.intermediate_size=64", "mesh.shape=[-1,1,1]",
                 "train.lora.enabled=true", "train.lora.targets=[q, v]", "train.lora.rank=4"]
    cfg = load_config("quickstart", overrides)
    out = _fresh(synthetic_run / "lora")
    build_finetune(cfg, synthetic_run / "for-lora", out, synthetic_run / "lora-ckpt", progress=False)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert any(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B moved off zero
    # The base weights did not train: the merged model differs from the initial one only in q and v.
    tokenizer_vocab = load_hf_llama(out / "model").config.vocab_size
    initial = build_model(cfg, tokenizer_vocab)
    merged = load_hf_llama(out / "model", scan_layers=False)  # the quickstart's layout, as build_model's
    np.testing.assert_array_equal(np.asarray(merged.layers[0].mlp.up_proj.kernel.get_value()),
                                  np.asarray(initial.layers[0].mlp.up_proj.kernel.get_value()))
    assert not np.array_equal(np.asarray(merged.layers[0].self_attn.q_proj.kernel.get_value()),
                              np.asarray(initial.layers[0].self_attn.q_proj.kernel.get_value()))


def test_the_no_torch_notice_of_transformers_is_silenced_and_other_messages_still_show():
    """Without torch, importing transformers logs "PyTorch was not found..."; the project uses it for
    tokenizers only, so importing the tokenizer module must not print it, while a real warning does."""
    import subprocess
    import sys

    hide_torch = "import sys; sys.modules['torch'] = None; "  # find_spec('torch') is None: torch 'not installed'
    plain = subprocess.run([sys.executable, "-c", hide_torch + "import transformers"], capture_output=True, text=True,
                           timeout=120)
    if "PyTorch was not found" not in plain.stderr:
        pytest.skip("this transformers prints no notice without torch; nothing to silence")
    ours = subprocess.run([sys.executable, "-c", hide_torch + "import recranker_jax.prompts.tokenizer; "
                           "from transformers.utils import logging; logging.get_logger('transformers').warning('real')"],
                          capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr
    assert "PyTorch was not found" not in ours.stderr and "real" in ours.stderr
