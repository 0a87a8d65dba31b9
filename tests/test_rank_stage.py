"""The rank stage on a tiny synthetic run: wiring from prompts to candidates, utilities,
orders and metrics, recomputed here independently from the stage's plain-file outputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from recranker_jax.config import load_config
from recranker_jax.errors import RecRankerError
from recranker_jax.data.split import load_split
from recranker_jax.prompts.stage import build_instructions, candidate_set_records, prompt_builder
from recranker_jax.prompts.tokenizer import load_tokenizer
from recranker_jax.rank.stage import build_ranking, evaluated_users
from recranker_jax.report import format_table
from recranker_jax.run import read_candidates
from recranker_jax.retrieval.stage import build_retrieval
from recranker_jax.train.stage import build_finetune
from tests.helpers import synthetic_split

SMALL = ["retrieval.epochs=2", "retrieval.eval_every=1", "retrieval.dim=16", "retrieval.batch_size=64",
         "retrieval.explicit_mf.epochs=2", "retrieval.explicit_mf.eval_every=1", "mesh.shape=[-1,1,1]",
         "sampling.size=100", "sampling.clusters=4", "prompts.tokenizer_vocab_size=600", "train.steps=3",
         "train.batch_size=8", "train.seq_len=512", "train.warmup_steps=1", "model.hidden_size=32",
         "model.intermediate_size=64", "rank.users=all", "rank.bootstrap=50"]


def folder(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    synthetic_split(root / "data", n_users=24)
    cfg = load_config("quickstart", SMALL)
    build_retrieval(cfg, root / "data", folder(root / "retrieval"), root / "ckpt", progress=False)
    build_instructions(cfg, root / "data", root / "retrieval", folder(root / "instructions"))
    build_finetune(cfg, root / "instructions", folder(root / "finetune"), root / "ft-ckpt", progress=False)
    document = build_ranking(cfg, root / "data", root / "retrieval", root / "instructions", root / "finetune",
                             folder(root / "ranking"))
    return root, cfg, document


def test_backbone_metrics_match_an_independent_computation_from_the_csv_files(run):
    root, _, document = run
    candidates = pd.read_csv(root / "retrieval" / "candidates.csv", dtype=str)
    test = pd.read_csv(root / "data" / "test.csv", dtype=str)
    target = dict(zip(test["user_id"], test["item_id"]))
    ndcg3 = []
    for user, group in candidates.groupby("user_id"):
        ranked = group.sort_values("rank", key=lambda r: r.astype(int))["item_id"].tolist()
        hit = ranked.index(target[user]) + 1 if target[user] in ranked else None
        ndcg3.append(1 / np.log2(hit + 1) if hit and hit <= 3 else 0.0)
    ndcg3 += [0.0] * (len(test) - len(ndcg3))
    got = document["splits"]["test"]["methods"]["backbone"]["metrics"]["ndcg@3"]
    assert got == pytest.approx(np.mean(ndcg3), abs=1e-6)
    assert document["splits"]["test"]["scored_users"] == len(test)  # rank.users=all


def test_rankings_reorder_each_users_candidates_by_the_recomputed_hybrid_utility(run):
    root, cfg, _ = run
    scores = np.load(root / "ranking" / "scores_test.npz")
    candidates = scores["candidates"]
    k = candidates.shape[1]
    # Independent recomputation of the reference's utilities from the raw scorer outputs.
    point = scores["expected_rating"] + 0.05 * (k - np.arange(k))
    pair = np.zeros_like(point)
    for u in range(len(candidates)):
        for (a, b), (ab, ba) in zip(scores["pairs"][u], scores["prefers_first"][u]):
            if a < 0:
                continue
            if ab == 1 and ba == 0:
                pair[u, a] += 0.5
            elif ab == 0 and ba == 1:
                pair[u, b] += 0.5
            else:
                pair[u, a] += 0.25
                pair[u, b] += 0.25
    places = scores["list_positions"]
    listwise = np.where((places >= 1) & (places <= 5), 0.025 * (6 - places), 0.0)
    utility = point + pair + listwise
    assert sorted(places[0][places[0] > 0].tolist()) == [1, 2, 3, 4, 5]
    rankings = pd.read_csv(root / "ranking" / "rankings.csv", dtype={"user_id": str, "item_id": str})
    items = pd.read_csv(root / "data" / "items.csv", dtype=str)["item_id"].to_numpy()
    users = pd.read_csv(root / "data" / "test.csv", dtype=str)["user_id"].to_numpy()
    for u in range(len(candidates)):
        expected = [items[candidates[u][j]] for j in sorted(range(k), key=lambda j: (-utility[u, j], j))]
        rows = rankings[(rankings["user_id"] == users[u]) & (rankings["method"] == "hybrid")]
        assert rows.sort_values("position")["item_id"].tolist() == expected
        backbone = rankings[(rankings["user_id"] == users[u]) & (rankings["method"] == "backbone")]
        assert backbone.sort_values("position")["item_id"].tolist() == [items[c] for c in candidates[u]]


def test_pointwise_score_is_the_expected_rating_of_that_candidates_own_prompt(run):
    from recranker_jax.llm.hf_import import load_hf_llama
    from recranker_jax.prompts.tokenizer import load_tokenizer

    root, _, _ = run
    scores = np.load(root / "ranking" / "scores_test.npz")
    items = pd.read_csv(root / "data" / "items.csv", dtype=str)["item_id"].tolist()
    users = pd.read_csv(root / "data" / "test.csv", dtype=str)["user_id"].tolist()
    records = [json.loads(line) for line in (root / "instructions" / "test.jsonl").read_text().splitlines()]
    record = [r for r in records if r["task"] == "pointwise"][13]
    u = users.index(record["user_id"])
    j = list(scores["candidates"][u]).index(items.index(record["candidate"]))
    tokenizer = load_tokenizer(root / "finetune" / "model")
    model = load_hf_llama(root / "finetune" / "model")
    answers = [tokenizer(f" {r}", add_special_tokens=False)["input_ids"] for r in range(1, 6)]
    ids = tokenizer(record["prompt"])["input_ids"] + answers[0][:-1]  # the answers' shared lead, if any
    logits = np.asarray(jax.nn.log_softmax(model(jnp.asarray(ids)[None])[0, -1]))
    p = np.exp(logits[[a[-1] for a in answers]])
    assert scores["expected_rating"][u, j] == pytest.approx(float(p @ np.arange(1, 6) / p.sum()), abs=1e-4)


def test_generate_mode_reports_unreadable_outputs_and_falls_back_to_rating_3(run):
    root, _, _ = run
    cfg = load_config("quickstart", [*SMALL, "rank.mode=generate", "rank.splits=[test]", "rank.generate_tokens=12"])
    document = build_ranking(cfg, root / "data", root / "retrieval", root / "instructions", root / "finetune",
                             folder(root / "ranking-generate"))
    rates = document["splits"]["test"]["rates"]
    assert set(rates) == {"pointwise", "pairwise", "listwise"}
    assert all(0.0 <= r["unreadable"] <= 1.0 for r in rates.values())
    ratings = np.load(root / "ranking-generate" / "scores_test.npz")["expected_rating"]
    readable = ratings[ratings != 3.0]
    assert set(np.unique(readable)).issubset({1.0, 2.0, 4.0, 5.0})  # parsed integers or the fallback 3
    if rates["pointwise"]["unreadable"] > 0:
        assert (ratings == 3.0).any()


def test_inputs_from_another_run_are_one_line_errors(run, tmp_path):
    import shutil

    root, cfg, _ = run
    instructions = tmp_path / "instructions"
    shutil.copytree(root / "instructions", instructions)
    lines = (instructions / "test.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["candidate"] = "no-such-item"
    (instructions / "test.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(RecRankerError, match=r"test.jsonl, line 1: .* do not match this run's retrieval candidates"):
        build_ranking(cfg, root / "data", root / "retrieval", instructions, root / "finetune", folder(tmp_path / "out"))
    with pytest.raises(RecRankerError, match=r"rank.ks=\[3, 20\]"):  # refused when the config loads
        load_config("quickstart", [*SMALL, "rank.ks=[3, 20]"])


def test_planted_candidates_score_every_user_and_the_baselines_are_methods(run, tmp_path):
    """rank.candidates=planted ranks with the protocol run's own instructions and tuned model
    (the candidate set is not part of them): every user scored under rank.users=hits, the backbone
    order keeping its protocol NDCG@3, and the non-LLM baselines ranked and tested against the
    backbone like the LLM."""
    root, _, document = run
    overrides = [*SMALL, "rank.users=hits", "rank.candidates=planted", "rank.baselines=[transition, random, mf, explicit_mf]"]
    cfg = load_config("quickstart", overrides)
    planted = build_ranking(cfg, root / "data", root / "retrieval", root / "instructions", root / "finetune",
                            folder(tmp_path / "ranking"))
    test = pd.read_csv(root / "data" / "test.csv", dtype=str)
    assert planted["candidates"] == "planted"
    for split in ("test", "valid"):
        result = planted["splits"][split]
        assert result["scored_users"] == result["hit_users"] == result["users"] == len(test)
        for k in (3, 5):  # below the last of the 10 positions the held-out item keeps its rank
            assert result["methods"]["backbone"]["metrics"][f"ndcg@{k}"] == pytest.approx(
                document["splits"][split]["methods"]["backbone"]["metrics"][f"ndcg@{k}"], abs=1e-6)
        assert result["methods"]["backbone"]["metrics"]["hr@10"] == 1.0
        for method in ("transition", "random", "mf", "explicit_mf", "hybrid"):
            assert 0.0 <= result["methods"][method]["paired"]["ndcg@3"]["p_value"] <= 1.0
        planted_file = pd.read_csv(root / "retrieval" / ("candidates_planted.csv" if split == "test"
                                                           else "candidates_planted_valid.csv"), dtype=str)
        held_out = pd.read_csv(root / "data" / f"{split}.csv", dtype=str)[["user_id", "item_id"]]
        last = planted_file[planted_file["rank"] == "10"].merge(held_out, on=["user_id", "item_id"])
        assert result["held_out_last"] == len(last)
    rankings = pd.read_csv(tmp_path / "ranking" / "rankings.csv", dtype={"user_id": str, "item_id": str})
    candidates = pd.read_csv(root / "retrieval" / "candidates_planted.csv", dtype={"user_id": str, "item_id": str})
    for user, group in rankings[rankings["method"] == "mf"].groupby("user_id"):
        own = candidates[candidates["user_id"] == user].sort_values("rank")["item_id"].tolist()
        assert sorted(group["item_id"]) == sorted(own) and test.set_index("user_id").loc[user, "item_id"] in own


def test_planted_prompts_are_built_as_the_instructions_stage_builds_the_protocols(run):
    """The rank stage's prompts over another candidate set equal, record for record, the
    instructions stage's prompts wherever the two sets hold the same items, and every listwise
    prompt shows the user's planted set, held-out item included."""
    root, cfg, _ = run
    data = load_split(root / "data")
    planted = read_candidates(root / "retrieval" / "candidates_planted.csv", data)
    retrieved = read_candidates(root / "retrieval" / "candidates.csv", data)
    builder, _ = prompt_builder(cfg, data, root / "retrieval")
    records = candidate_set_records(cfg, builder, data, load_tokenizer(root / "instructions" / "tokenizer"), planted)
    protocol = [json.loads(line) for line in (root / "instructions" / "test.jsonl").read_text().splitlines()]
    user_ids = data.user_ids.astype(str)
    same = {user_ids[u] for u in range(data.n_users) if planted[u] == retrieved[u]}
    assert same and len(same) < data.n_users  # both kinds of user occur
    assert [r for r in records if r["user_id"] in same] == [r for r in protocol if r["user_id"] in same]
    items = data.items["item_id"].astype(str).to_numpy()
    listed = {r["user_id"]: r["candidates"] for r in records if r["task"] == "listwise"}
    assert len(listed) == data.n_users
    for u in range(data.n_users):
        assert sorted(listed[user_ids[u]]) == sorted(items[planted[u]]) and items[data.test_item[u]] in listed[user_ids[u]]


def test_sampled_candidates_score_every_user_from_the_sampled_file(run, tmp_path):
    """rank.candidates=sampled: the orders are over retrieval's sampled sets, every user is
    scored, and the backbone order ranks the held-out item where its score falls."""
    root, _, _ = run
    cfg = load_config("quickstart", [*SMALL, "rank.candidates=sampled", "rank.baselines=[random]", "rank.splits=[test]"])
    sampled = build_ranking(cfg, root / "data", root / "retrieval", root / "instructions", root / "finetune",
                            folder(tmp_path / "ranking"))
    result, users = sampled["splits"]["test"], len(pd.read_csv(root / "data" / "test.csv"))
    assert sampled["candidates"] == "sampled" and result["scored_users"] == result["hit_users"] == users
    assert result["methods"]["backbone"]["metrics"]["hr@10"] == 1.0 and result["held_out_last"] < users
    file = pd.read_csv(root / "retrieval" / "candidates_sampled.csv", dtype={"user_id": str, "item_id": str})
    own = file.sort_values(["user_id", "rank"]).groupby("user_id")["item_id"].apply(list).to_dict()
    rankings = pd.read_csv(tmp_path / "ranking" / "rankings.csv", dtype={"user_id": str, "item_id": str})
    hybrid = rankings[rankings["method"] == "hybrid"].groupby("user_id")["item_id"].apply(sorted).to_dict()
    assert hybrid == {u: sorted(items) for u, items in own.items()}


def test_a_user_sample_evaluates_the_same_users_everywhere_with_the_full_runs_answers(run, tmp_path):
    """rank.sample_users=N: N seeded users, the same in both splits; the LLM scores no one else;
    each method's metrics are the full run's per-user results averaged over the sample."""
    root, cfg, full = run
    n = 9
    sample_cfg = load_config("quickstart", [*SMALL, f"rank.sample_users={n}"])
    sampled = build_ranking(sample_cfg, root / "data", root / "retrieval", root / "instructions", root / "finetune",
                            folder(tmp_path / "ranking"))
    assert sampled["sample_users"] == n
    assert f"test: {n} users (a seeded sample: rank.sample_users)" in format_table(sampled, "test")
    kept = evaluated_users(24, n, cfg.run.seed)
    assert kept.sum() == n and not evaluated_users(24, n, cfg.run.seed + 1).tolist() == kept.tolist()
    user_ids = load_split(root / "data").user_ids.astype(str)
    chosen = set(user_ids[kept])
    for split in ("test", "valid"):
        result = sampled["splits"][split]
        assert result["users"] == n and result["scored_users"] == n  # rank.users=all: each evaluated user, no one else
        full_rows = pd.read_csv(root / "ranking" / ("rankings.csv" if split == "test" else "rankings_valid.csv"),
                                dtype={"user_id": str, "item_id": str})
        rows = pd.read_csv(tmp_path / "ranking" / ("rankings.csv" if split == "test" else "rankings_valid.csv"),
                           dtype={"user_id": str, "item_id": str})
        for method in ("backbone", "pointwise", "hybrid"):  # the same answers, hence the same orders, for the sample
            mine = rows[(rows["method"] == method) & rows["user_id"].isin(chosen)]
            theirs = full_rows[(full_rows["method"] == method) & full_rows["user_id"].isin(chosen)]
            assert mine["item_id"].tolist() == theirs["item_id"].tolist()
        held = pd.read_csv(root / "data" / f"{split}.csv", dtype=str).set_index("user_id")["item_id"]
        for method in ("backbone", "hybrid"):
            order = rows[(rows["method"] == method) & rows["user_id"].isin(chosen)]
            gains = [1 / np.log2(group["item_id"].tolist().index(held[user]) + 2)
                     if held[user] in group["item_id"].tolist()[:3] else 0.0 for user, group in order.groupby("user_id")]
            assert result["methods"][method]["metrics"]["ndcg@3"] == pytest.approx(np.mean(gains), abs=1e-6)
    with pytest.raises(RecRankerError, match=r"rank.sample_users=0: expected a positive number of users"):
        load_config("quickstart", [*SMALL, "rank.sample_users=0"])


def test_tuned_hybrid_weights_come_from_the_validation_item_and_serve_every_split(run, tmp_path):
    root, cfg, fixed = run
    tuned_cfg = load_config("quickstart", [*SMALL, "rank.tune_alphas=true"])
    tuned = build_ranking(tuned_cfg, root / "data", root / "retrieval", root / "instructions", root / "finetune",
                          folder(tmp_path / "ranking"))
    alphas = tuned["tuned_alphas"]["alphas"]
    assert tuned["tuned_alphas"]["on"] == "valid" and all(a in (0.0, 0.25, 0.5, 1.0, 2.0) for a in alphas)
    assert fixed["splits"]["test"]["alphas"] == list(cfg.rank.alphas)
    for split in ("test", "valid"):
        assert tuned["splits"][split]["alphas"] == alphas
        for method in ("backbone", "pointwise", "pairwise", "listwise"):  # the same LLM answers, scored once
            assert tuned["splits"][split]["methods"][method]["metrics"] == fixed["splits"][split]["methods"][method]["metrics"]
    assert (tuned["splits"]["valid"]["methods"]["hybrid"]["metrics"]["ndcg@3"]
            >= fixed["splits"]["valid"]["methods"]["hybrid"]["metrics"]["ndcg@3"])
    with pytest.raises(RecRankerError, match=r"rank.tune_alphas=true chooses the hybrid's weights on the validation "
                                             r"item: expected valid in rank.splits"):
        load_config("quickstart", [*SMALL, "rank.tune_alphas=true", "rank.splits=[test]"])
