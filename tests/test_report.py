"""Tests for recranker_jax.rank.evaluate (metrics recomputed by hand, rankings.csv re-read with
pandas alone) and recranker_jax.report (report.md, metrics.json, the plot, compare_runs, CLI)."""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recranker_jax.cli import main
from recranker_jax.errors import RecRankerError
from recranker_jax.metrics import bootstrap_interval
from recranker_jax.rank.evaluate import evaluate_orders, write_rankings_csv
from recranker_jax.report import compare_runs, format_table, plot_metrics, verdict_lines, write_report

KS = (1, 3)
N_BOOTSTRAP = 200

# Six users, four candidates each (item indices), in retrieval order; user 4 has no held-out item.
CANDIDATES = np.array(
    [
        [1, 2, 3, 4],
        [5, 6, 7, 8],
        [9, 10, -1, -1],  # padded; the target is not among the candidates
        [1, 5, 9, 13],
        [2, 3, 4, 5],
        [7, 8, 9, 10],
    ]
)
TARGET = np.array([3, 5, 11, 13, -1, 7])
HYBRID = np.array(
    [
        [3, 1, 2, 4],
        [6, 5, 7, 8],
        [10, 9, -1, -1],
        [13, 1, 5, 9],
        [5, 4, 3, 2],
        [8, 9, 10, 7],
    ]
)
# 1-based rank of the target for the five users with a target (0 = not among the candidates)
BACKBONE_RANKS = [3, 1, 0, 4, 1]
HYBRID_RANKS = [1, 2, 0, 1, 4]
HYBRID_UTILITY = np.array(  # aligned with CANDIDATES (retrieval order), consistent with HYBRID
    [
        [2.0, 1.0, 3.0, 0.5],
        [1.0, 2.0, 0.5, 0.25],
        [1.0, 2.0, 0.0, 0.0],
        [1.0, 0.5, 0.25, 3.0],
        [0.1, 0.2, 0.3, 0.4],
        [0.1, 4.0, 3.0, 2.0],
    ]
)
USER_IDS = np.array([f"user{u}" for u in range(6)])
ITEM_IDS = np.array([f"item{i}" for i in range(14)])


def hand_metrics(ranks: list[int], k: int) -> tuple[list[float], list[float]]:
    hr = [1.0 if 0 < r <= k else 0.0 for r in ranks]
    ndcg = [1.0 / math.log2(r + 1) if 0 < r <= k else 0.0 for r in ranks]
    return hr, ndcg


def exact_sign_flip_pvalue(a: list[float], b: list[float]) -> float:
    differences = [x - y for x, y in zip(a, b) if x != y]
    if not differences:
        return 1.0
    observed = abs(sum(differences))
    patterns = list(itertools.product((1, -1), repeat=len(differences)))
    return sum(abs(sum(s * d for s, d in zip(signs, differences))) >= observed - 1e-12 for signs in patterns) / len(patterns)


@pytest.fixture(scope="module")
def evaluation() -> dict:
    return evaluate_orders({"backbone": CANDIDATES, "hybrid": HYBRID}, TARGET, KS, N_BOOTSTRAP, seed=3)


# ------------------------------------------------------------------------------- evaluate_orders


def test_means_over_all_users_match_hand_computation(evaluation):
    assert evaluation["users"] == 5 and evaluation["hit_users"] == 4
    assert evaluation["ks"] == [1, 3] and evaluation["baseline"] == "backbone"
    for method, ranks in (("backbone", BACKBONE_RANKS), ("hybrid", HYBRID_RANKS)):
        for k in KS:
            hr, ndcg = hand_metrics(ranks, k)
            metrics = evaluation["methods"][method]["metrics"]
            assert metrics[f"hr@{k}"] == pytest.approx(sum(hr) / 5)
            assert metrics[f"ndcg@{k}"] == pytest.approx(sum(ndcg) / 5)
    # spelled out: hybrid NDCG@3 = (1 + 1/log2(3) + 0 + 1 + 0) / 5
    assert evaluation["methods"]["hybrid"]["metrics"]["ndcg@3"] == pytest.approx((2 + 1 / math.log2(3)) / 5)
    assert evaluation["methods"]["backbone"]["metrics"]["hr@1"] == pytest.approx(2 / 5)


def test_conditional_metrics_use_only_users_with_a_hit(evaluation):
    for method, ranks in (("backbone", BACKBONE_RANKS), ("hybrid", HYBRID_RANKS)):
        conditional = evaluation["methods"][method]["conditional"]
        assert conditional["users"] == 4
        hit_ranks = [r for r in ranks if r > 0]
        for k in KS:
            hr, ndcg = hand_metrics(hit_ranks, k)
            assert conditional["metrics"][f"hr@{k}"] == pytest.approx(sum(hr) / 4)
            assert conditional["metrics"][f"ndcg@{k}"] == pytest.approx(sum(ndcg) / 4)


def test_intervals_are_bootstraps_of_the_per_user_values(evaluation):
    for method, ranks in (("backbone", BACKBONE_RANKS), ("hybrid", HYBRID_RANKS)):
        for k in KS:
            hr, ndcg = hand_metrics(ranks, k)
            entry = evaluation["methods"][method]
            assert entry["intervals"][f"ndcg@{k}"] == pytest.approx(list(bootstrap_interval(np.array(ndcg), N_BOOTSTRAP, 0.95, 3)))
            assert entry["intervals"][f"hr@{k}"] == pytest.approx(list(bootstrap_interval(np.array(hr), N_BOOTSTRAP, 0.95, 3)))
            low, high = entry["intervals"][f"ndcg@{k}"]
            assert 0.0 <= low <= entry["metrics"][f"ndcg@{k}"] <= high <= 1.0


def test_paired_test_against_the_backbone(evaluation):
    assert "paired" not in evaluation["methods"]["backbone"]
    for k in KS:
        _, hybrid_ndcg = hand_metrics(HYBRID_RANKS, k)
        _, backbone_ndcg = hand_metrics(BACKBONE_RANKS, k)
        paired = evaluation["methods"]["hybrid"]["paired"][f"ndcg@{k}"]
        assert paired["difference"] == pytest.approx((sum(hybrid_ndcg) - sum(backbone_ndcg)) / 5)
        assert paired["p_value"] == pytest.approx(exact_sign_flip_pvalue(hybrid_ndcg, backbone_ndcg))


def test_output_is_strict_json_and_empty_conditionals_are_null():
    misses = np.array([[1, 2], [3, 4]])
    result = evaluate_orders({"backbone": misses, "listwise": misses[:, ::-1]}, np.array([7, 8]), (1, 2), 50, seed=0)
    text = json.dumps(result, allow_nan=False)  # NaN would fail here
    assert json.loads(text) == result
    assert result["methods"]["listwise"]["conditional"] == {
        "users": 0, "metrics": {"hr@1": None, "ndcg@1": None, "hr@2": None, "ndcg@2": None},
        "intervals": {name: [None, None] for name in ("hr@1", "ndcg@1", "hr@2", "ndcg@2")},
    }
    assert result["methods"]["listwise"]["paired"]["ndcg@2"] == {"difference": 0.0, "p_value": 1.0}


def test_evaluate_orders_user_errors():
    with pytest.raises(RecRankerError, match="baseline 'backbone'"):
        evaluate_orders({"hybrid": HYBRID}, TARGET, KS, 10, 0)
    with pytest.raises(RecRankerError, match=r"orders\['hybrid'\] has shape"):
        evaluate_orders({"backbone": CANDIDATES, "hybrid": HYBRID[:3]}, TARGET, KS, 10, 0)
    with pytest.raises(ValueError, match="does not re-order"):
        evaluate_orders({"backbone": CANDIDATES, "hybrid": CANDIDATES + 1}, TARGET, KS, 10, 0)


def test_rankings_csv_reproduces_the_metrics_with_pandas_alone(tmp_path, evaluation):
    path = tmp_path / "rankings.csv"
    orders = {"backbone": CANDIDATES, "hybrid": HYBRID}
    write_rankings_csv(path, USER_IDS, ITEM_IDS, orders, {"hybrid": HYBRID_UTILITY}, CANDIDATES)
    table = pd.read_csv(path, dtype={"user_id": str, "item_id": str})
    assert list(table.columns) == ["user_id", "method", "position", "item_id", "utility"]
    assert len(table) == 2 * (5 * 4 + 2)  # padded slots of user2 are skipped
    assert table.loc[table.user_id == "user2", "position"].max() == 2
    assert table.user_id.iloc[0] == "user0" and table.method.iloc[0] == "backbone"
    # the hybrid's utility column is its utility, non-increasing down the list; the backbone has none
    hybrid_rows = table[table.method == "hybrid"]
    assert hybrid_rows.groupby("user_id")["utility"].apply(lambda u: u.is_monotonic_decreasing).all()
    row = hybrid_rows[(hybrid_rows.user_id == "user5") & (hybrid_rows.position == 1)].iloc[0]
    assert row.item_id == "item8" and row.utility == pytest.approx(4.0)
    assert table.loc[table.method == "backbone", "utility"].isna().all()

    targets = {USER_IDS[u]: ITEM_IDS[t] for u, t in enumerate(TARGET) if t >= 0}
    for method in orders:
        rows = table[(table.method == method) & (table.item_id == table.user_id.map(targets))]
        rank = dict(zip(rows.user_id, rows.position))
        for k in KS:
            hr = sum(1.0 for u in targets if rank.get(u, 99) <= k) / len(targets)
            ndcg = sum(1 / math.log2(rank[u] + 1) for u in targets if rank.get(u, 99) <= k) / len(targets)
            assert hr == pytest.approx(evaluation["methods"][method]["metrics"][f"hr@{k}"])
            assert ndcg == pytest.approx(evaluation["methods"][method]["metrics"][f"ndcg@{k}"])


# ------------------------------------------------------------------------------- the report


def fake_run(root: Path, name: str, order_hybrid: np.ndarray = HYBRID, extra: bool = True,
             planted: bool = False) -> Path:
    """A run folder holding only what the report reads; ranking metrics from evaluate_orders
    (planted: a transition baseline too, and the metrics' candidates say planted)."""
    run_dir = root / name
    (run_dir / "ranking").mkdir(parents=True)
    orders = {"backbone": CANDIDATES, "pointwise": CANDIDATES, "hybrid": order_hybrid}
    if planted:
        orders = {"hybrid": order_hybrid, "transition": order_hybrid, **orders}  # stored out of display order
    test = evaluate_orders(orders, TARGET, (1, 3), N_BOOTSTRAP, seed=0)
    test.update(scored_users=4, seconds_per_item=0.0123,
                rates={"pointwise": {"unreadable": 0.25, "inconsistent": None},
                       "pairwise": {"unreadable": 0.1, "inconsistent": 0.375}})
    valid = evaluate_orders(orders, np.array([1, 6, 9, 5, 2, 10]), (1, 3), N_BOOTSTRAP, seed=0)
    valid.update(scored_users=6, seconds_per_item=0.02, rates={})
    metrics = {"mode": "scores", "splits": {"test": test, "valid": valid}}
    if planted:
        metrics.update(candidates="planted", baselines=["transition"])
        test["held_out_last"] = 3
    (run_dir / "ranking" / "metrics.json").write_text(json.dumps(metrics))
    if extra:
        (run_dir / "config.yaml").write_text(f"run:\n  name: {name}\nrank:\n  alphas: [1.0, 1.0, 1.0]\n")
        (run_dir / "finetune").mkdir()
        (run_dir / "finetune" / "summary.json").write_text(json.dumps({"examples": 321, "steps": 7, "last_loss": 1.25}))
        (run_dir / "retrieval").mkdir()
        (run_dir / "retrieval" / "metrics.json").write_text(json.dumps(
            {"backbone": "lightgcn", "candidates": 4,
             "models": {"lightgcn": {"test": {"ndcg@10": 0.0567, "protocol_hr@3": 0.0432}}}}))
    return run_dir


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first markdown table after `heading`."""
    lines = markdown[markdown.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def table_lines(text: str) -> list[str]:
    """The lines of the first markdown table in `text`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def cell(mean: float, interval: list[float]) -> str:
    return f"{mean:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"


def test_write_report_contents(tmp_path):
    run_dir = fake_run(tmp_path, "demo")
    metrics = json.loads((run_dir / "ranking" / "metrics.json").read_text())
    test = metrics["splits"]["test"]
    path = write_report(run_dir)
    assert path == run_dir / "report.md"
    text = path.read_text()

    rows = table_rows(text, "## Split: test")
    assert [r[0] for r in rows] == ["backbone", "pointwise", "hybrid"]
    hybrid = test["methods"]["hybrid"]
    expected = [cell(hybrid["metrics"][n], hybrid["intervals"][n]) for n in ("hr@1", "ndcg@1", "hr@3", "ndcg@3")]
    assert rows[2][1:] == expected
    assert rows[2][4].startswith(f"{(2 + 1 / math.log2(3)) / 5:.4f}")  # hand-computed hybrid NDCG@3

    conditional = table_rows(text, "### Conditional on a hit in the candidates (4 users)")
    assert conditional[2][4].startswith(f"{(2 + 1 / math.log2(3)) / 4:.4f}")

    paired = table_rows(text, "### Paired sign-flip")
    assert [r[0] for r in paired] == ["pointwise vs backbone", "hybrid vs backbone"]
    difference = hybrid["paired"]["ndcg@3"]["difference"]
    assert paired[1][2] == f"{difference:+.4f} (p = {hybrid['paired']['ndcg@3']['p_value']:.3f})"
    assert paired[0][1] == "+0.0000 (p = 1.000)"  # pointwise kept the backbone's order

    rates = table_rows(text, "### LLM answers")
    assert rates == [["pointwise", "0.2500", "–"], ["pairwise", "0.1000", "0.3750"]]
    assert "seconds per scored item: 0.0123" in text and "Scored users: 4" in text
    assert "## Split: valid" in text and text.index("## Split: test") < text.index("## Split: valid")
    assert ["examples", "321"] in table_rows(text, "## Instruction tuning")
    assert ["lightgcn", "0.0567", "0.0432"] in table_rows(text, "## Retrieval")
    assert "```yaml" not in text and "The run's config is [config.yaml](config.yaml)" in text  # linked, not pasted
    assert "None" not in text

    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    png = (run_dir / "plots" / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_without_optional_files(tmp_path):
    run_dir = fake_run(tmp_path, "bare", extra=False)
    text = write_report(run_dir).read_text()
    assert "(no config.yaml)" in text and "## Instruction tuning" not in text and "## Retrieval" not in text


def test_format_table_numbers(tmp_path):
    metrics = json.loads((fake_run(tmp_path, "demo") / "ranking" / "metrics.json").read_text())
    text = format_table(metrics)
    lines = text.splitlines()
    assert lines[0].split() == ["method", "HR@1", "NDCG@1", "HR@3", "NDCG@3"]
    hybrid_line = next(line for line in lines if line.startswith("hybrid "))
    means = re.findall(r"(\d\.\d{4}) \[", hybrid_line)
    hybrid = metrics["splits"]["test"]["methods"]["hybrid"]["metrics"]
    assert [float(m) for m in means] == pytest.approx([hybrid[n] for n in ("hr@1", "ndcg@1", "hr@3", "ndcg@3")], abs=5e-5)
    assert "5 users, 4 with the held-out item among the candidates" in text
    assert "valid: 6 users, 6 with the held-out item" in format_table(metrics, "valid")
    with pytest.raises(RecRankerError, match="no split 'train'"):
        format_table(metrics, "train")


def test_compare_runs_side_by_side(tmp_path):
    first = fake_run(tmp_path, "full")
    second = fake_run(tmp_path, "no_hints", order_hybrid=CANDIDATES)
    (second / "retrieval").mkdir(exist_ok=True)
    (second / "retrieval" / "metrics.json").write_text(json.dumps({"backbone": "sasrec", "candidates": 10}))
    text = compare_runs([first, second])
    table = table_lines(text)
    rows = [[c.strip() for c in line.strip("|").split("|")][:1] + [c.strip() for c in line.strip("|").split("|")][2:]
            for line in table[2:]]  # without the backbone column, checked here:
    assert [line.split("|")[2].strip() for line in table[2:]] == ["lightgcn"] * 3 + ["sasrec"] * 3
    assert [(r[0], r[2]) for r in rows] == [(run, m) for run in ("full", "no_hints") for m in ("backbone", "pointwise", "hybrid")]
    assert {r[1] for r in rows} == {"retrieved"}  # metrics without a candidates key are the protocol's
    assert table[0] == ("| run | backbone | candidates | method | hit users | HR@1 | NDCG@1 | HR@3 | NDCG@3 "
                                    "| ΔNDCG@1 vs backbone (p) |")
    for run_dir, row in ((first, rows[2]), (second, rows[5])):
        hybrid = json.loads((run_dir / "ranking" / "metrics.json").read_text())["splits"]["test"]["methods"]["hybrid"]
        assert row[3:8] == ["4"] + [cell(hybrid["metrics"][n], hybrid["intervals"][n]) for n in ("hr@1", "ndcg@1", "hr@3", "ndcg@3")]
        paired = hybrid["paired"]["ndcg@1"]
        assert row[8] == f"{paired['difference']:+.4f} (p = {paired['p_value']:.3f})"
    assert rows[0][8] == "–"  # the backbone is not tested against itself
    assert rows[5][7].startswith(f"{(1 / math.log2(4) + 1 + 1) / 5:.4f}")  # hybrid = backbone order: ranks 3, 1, -, 4, 1


def test_a_planted_run_is_titled_as_such_and_compared_beside_a_protocol_run(tmp_path):
    protocol, planted = fake_run(tmp_path, "protocol"), fake_run(tmp_path, "planted", planted=True)
    text = write_report(planted).read_text()
    assert "## Split: test (planted evaluation)" in text and "Candidates: planted" in text
    assert "not the RecRanker protocol" in text and "Non-LLM controls" in text and "transition (" in text
    assert "puts the held-out item last for 3 of them" in text
    assert [r[0] for r in table_rows(text, "## Split: test")] == ["backbone", "transition (control)", "pointwise", "hybrid"]
    assert "transition (control) vs backbone" in [r[0] for r in table_rows(text, "### Paired sign-flip")]
    assert "(planted evaluation)" not in write_report(protocol).read_text()
    metrics = json.loads((planted / "metrics.json").read_text())
    assert "test: 5 users, planted candidates" in format_table(metrics)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table_lines(compare_runs([protocol, planted]))[2:]]
    assert [(r[0], r[2], r[3]) for r in rows] == (
        [("protocol", "retrieved", m) for m in ("backbone", "pointwise", "hybrid")]
        + [("planted", "planted", m) for m in ("backbone", "transition (control)", "pointwise", "hybrid")])


def test_a_sampled_run_with_tuned_weights_says_so(tmp_path):
    run = fake_run(tmp_path, "sampled")
    path = run / "ranking" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics.update(candidates="sampled", tuned_alphas={"alphas": [0.5, 0.0, 0.25], "on": "valid", "metric": "ndcg@3",
                                                       "grid": [0.0, 0.25, 0.5, 1.0, 2.0]})
    path.write_text(json.dumps(metrics))
    text = write_report(run).read_text()
    assert "## Split: test (sampled evaluation)" in text and "items the user never rated, drawn uniformly" in text
    assert "Hybrid weights (pointwise, pairwise, listwise): [0.5, 0.0, 0.25], chosen on the validation item" in text
    assert "test: 5 users, sampled candidates (sampled evaluation:" in format_table(metrics)


def test_missing_ranking_metrics_is_a_user_error(tmp_path):
    (tmp_path / "unranked").mkdir()
    with pytest.raises(RecRankerError, match=r"unranked has no ranking/metrics.json; run `recranker rank`"):
        compare_runs([fake_run(tmp_path, "full"), tmp_path / "unranked"])
    with pytest.raises(RecRankerError, match="recranker rank"):
        write_report(tmp_path / "unranked")


# ------------------------------------------------------------------------------- CLI


def test_cli_report_runs(tmp_path, capsys):
    first, second = fake_run(tmp_path, "a"), fake_run(tmp_path, "b")
    assert main(["report", "--runs", str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == compare_runs([first, second])


def test_cli_report_of_the_configured_run(tmp_path, capsys):
    run_dir = fake_run(tmp_path, "cfgrun")
    assert main(["report", f"run.root={tmp_path}", "run.name=cfgrun"]) == 0
    out = capsys.readouterr().out
    assert str(run_dir / "report.md") in out
    assert format_table(json.loads((run_dir / "metrics.json").read_text())) in out
    assert "\n".join(f"[verdict] {line}" for line in verdict_lines(run_dir)) in out
    assert (run_dir / "plots" / "metrics.png").is_file()


def test_cli_report_missing_metrics(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", "--runs", str(tmp_path / "empty")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: run folder") and "recranker rank" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- the verdict

VERDICT = re.compile(r"(?P<method>\w+) NDCG@(?P<k>\d+) (?P<value>\d\.\d{4}) vs (?P<baseline>\d\.\d{4}) "
                     r"\(Δ (?P<difference>[+-]\d\.\d{4}), paired p (?P<p>= \d\.\d{3}|< 0\.001)\)")


def verdict_run(root: Path, name: str, llm_wins: bool) -> Path:
    """Ten users, four candidates each (item indices 4u..4u+3, the backbone's order); eight have their
    held-out item among them. llm_wins: the backbone ranks it third and the hybrid first for all eight;
    otherwise the backbone ranks it first and the hybrid third. Pointwise keeps the backbone order;
    the transition control swaps the first two."""
    users, hits = 10, 8
    candidates = np.arange(users * 4).reshape(users, 4)
    at = 2 if llm_wins else 0
    target = np.array([candidates[u, at] if u < hits else 999 for u in range(users)])
    moved = candidates[:, [2, 0, 1, 3]] if llm_wins else candidates[:, [1, 2, 0, 3]]
    orders = {"backbone": candidates, "transition": candidates[:, [1, 0, 2, 3]], "pointwise": candidates,
              "hybrid": moved}
    run_dir = root / name
    (run_dir / "ranking").mkdir(parents=True)
    (run_dir / "retrieval").mkdir()
    splits = {}
    for split in ("test", "valid"):
        result = evaluate_orders(orders, target, (1, 3, 4), N_BOOTSTRAP, seed=0)
        result.update(scored_users=hits, seconds_per_item=0.01, rates={})
        splits[split] = result
    (run_dir / "ranking" / "metrics.json").write_text(json.dumps(
        {"mode": "scores", "candidates": "retrieved", "baselines": ["transition"], "splits": splits}))
    (run_dir / "retrieval" / "metrics.json").write_text(json.dumps({"backbone": "lightgcn", "candidates": 4, "models": {}}))
    return run_dir


def check_verdict_against_tables(text: str, verdict: str, split: str) -> re.Match:
    """Every method quoted with a baseline in the verdict has the numbers of the split's tables."""
    quoted = list(VERDICT.finditer(verdict))
    assert quoted, verdict
    metrics_rows = {r[0]: r for r in table_rows(text, f"## Split: {split}")}
    header = ["method"] + [f"{m}@{k}" for k in (1, 3, 4) for m in ("HR", "NDCG")]
    paired_rows = {r[0]: r for r in table_rows(text[text.index(f"## Split: {split}"):], "### Paired sign-flip")}
    for match in quoted:
        column = header.index(f"NDCG@{match['k']}")
        assert metrics_rows[match["method"]][column].split(" [")[0] == match["value"]
        assert metrics_rows["backbone"][column].split(" [")[0] == match["baseline"]
        paired = paired_rows[f"{match['method']} vs backbone"][1 + [1, 3, 4].index(int(match["k"]))]
        assert paired == f"{match['difference']} (p {match['p']})"
    return quoted[0]


@pytest.mark.parametrize("llm_wins", [False, True])
def test_the_verdict_comes_first_and_its_numbers_are_the_tables(tmp_path, llm_wins):
    run_dir = verdict_run(tmp_path, "wins" if llm_wins else "loses", llm_wins)
    text = write_report(run_dir).read_text()
    assert text.index("## Verdict") < text.index("![") < text.index("## Split: test")
    metrics = json.loads((run_dir / "ranking" / "metrics.json").read_text())
    for split in ("test", "valid"):
        verdict = next(line for line in text.splitlines() if line.startswith(f"- **{split}**: "))
        match = check_verdict_against_tables(text, verdict, split)
        hybrid = metrics["splits"][split]["methods"]["hybrid"]
        assert match["method"] == "hybrid" and match["k"] == "1"
        assert float(match["value"]) == pytest.approx(hybrid["metrics"]["ndcg@1"], abs=5e-5)
        assert float(match["difference"]) == pytest.approx(hybrid["paired"]["ndcg@1"]["difference"], abs=5e-5)
        assert hybrid["paired"]["ndcg@1"]["p_value"] < 0.05  # the fixture is decisive either way
        if llm_wins:
            assert "The LLM beat the LightGCN order: hybrid NDCG@1 0.8000 vs 0.0000" in verdict
            assert "No LLM method" not in verdict
        else:
            assert "No LLM method beat the LightGCN order: hybrid NDCG@1 0.0000 vs 0.8000" in verdict
            assert "significantly below it" in verdict
        assert "Best non-LLM control: transition NDCG@1" in verdict
        assert "Only 8 of 10 users had the held-out item among the candidates" in verdict
    # the column no re-ranker of 4 candidates can change is named, the others are not
    assert "Note: HR@4 is the same for every method by construction" in text
    assert "HR@3 is the same" not in text and "NDCG@4 is the same" not in text
    assert verdict_lines(run_dir)[0].startswith("test: " + ("The LLM beat" if llm_wins else "No LLM method beat"))


def test_report_runs_gives_each_run_its_verdict_before_the_table(tmp_path, capsys):
    loses, wins = verdict_run(tmp_path, "loses", False), verdict_run(tmp_path, "wins", True)
    text = compare_runs([loses, wins])
    lines = text.splitlines()
    assert lines[0].startswith("- loses (test): No LLM method beat the LightGCN order: hybrid NDCG@1 0.0000 vs 0.8000")
    assert lines[1].startswith("- wins (test): The LLM beat the LightGCN order: hybrid NDCG@1 0.8000 vs 0.0000")
    assert lines[2] == "" and lines[3].startswith("| run |")
    for run_dir, line in ((loses, lines[0]), (wins, lines[1])):
        assert line.split(": ", 1)[1] == verdict_lines(run_dir)[0].split(": ", 1)[1]
    assert main(["report", "--runs", str(loses), str(wins), "--split", "valid"]) == 0
    assert "- wins (valid): The LLM beat" in capsys.readouterr().out


def test_verdict_without_llm_methods_and_under_the_sampled_evaluation():
    from recranker_jax.report import split_verdict

    orders = {"backbone": CANDIDATES, "transition": HYBRID}
    result = evaluate_orders(orders, TARGET, (1, 3), N_BOOTSTRAP, seed=0)
    assert split_verdict(result).startswith("No LLM method was evaluated; the backbone order scores NDCG@1 0.4000.")
    sampled = split_verdict(result, "sampled", "sasrec", sample_users=5)
    assert "All 5 users (a seeded sample, rank.sample_users=5) count: the sampled evaluation" in sampled


# ------------------------------------------------------------------------------- plot, HTML, provenance


def test_the_plot_separates_llm_methods_from_controls_and_says_who_can_move(tmp_path):
    from recranker_jax.report.plot import bar_styles, movable_users

    run_dir = fake_run(tmp_path, "demo", planted=True)
    result = json.loads((run_dir / "ranking" / "metrics.json").read_text())["splits"]["test"]
    figure = plot_metrics(result, tmp_path / "plot.png", "demo", "retrieved")
    styles = bar_styles(["backbone", "transition", "random", "pointwise", "hybrid"])
    assert [styles[m]["kind"] for m in styles] == ["backbone", "control", "control", "llm", "llm"]
    llm_colours = {styles[m]["color"] for m in ("pointwise", "hybrid")}
    control_colours = {styles[m]["color"] for m in ("transition", "random")}
    assert len(llm_colours) == 2 and not llm_colours & control_colours and styles["backbone"]["color"] not in llm_colours
    assert all(styles[m]["hatch"] for m in ("transition", "random")) and not styles["hybrid"]["hatch"]
    assert movable_users(result) == ("4 of 5 users can move: only they have the held-out item among the candidates, "
                                     "every other user is a miss for every method")
    assert movable_users(result, "sampled").startswith("all 5 users can move")
    assert figure._suptitle.get_text() == "demo\n" + movable_users(result)
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["backbone order", "transition (non-LLM control)", "pointwise (LLM)", "hybrid (LLM)"]


def test_report_html_embeds_the_plot(tmp_path):
    pytest.importorskip("markdown_it")
    run_dir = fake_run(tmp_path, "demo")
    write_report(run_dir)
    html = (run_dir / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html and "<h2>Verdict</h2>" in html
    png = (run_dir / "plots" / "metrics.png").read_bytes()
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in html


def test_missing_values_are_dashes_with_their_reason(tmp_path):
    run_dir = fake_run(tmp_path, "demo")
    (run_dir / "finetune" / "summary.json").write_text(json.dumps({"steps": 7, "median_mfu": None, "other": None}))
    text = write_report(run_dir).read_text()
    rows = dict(map(tuple, table_rows(text, "## Instruction tuning")))
    assert rows["median_mfu"].startswith("– (MFU needs the device's peak FLOP/s")
    assert rows["other"] == "– (not recorded)"
    assert "None" not in text


def staged(run_dir: Path, config: dict) -> None:
    """_stage.json markers for the report's stages, as the pipeline writes them."""
    from recranker_jax.run import write_marker

    for folder in ("retrieval", "finetune", "ranking"):
        write_marker(run_dir / folder, f"key-{folder}", 1.5, "0.1.0", config, {})


def test_the_report_verifies_the_files_it_reads_and_shows_where_stage_configs_disagree(tmp_path):
    run_dir = fake_run(tmp_path, "demo")
    config = {"run": {"name": "demo", "seed": 0}, "rank": {"candidates": "retrieved", "alphas": [1.0, 1.0, 1.0]}}
    staged(run_dir, config)
    (run_dir / "config.yaml").write_text("run:\n  name: demo\n  seed: 0\nrank:\n  candidates: retrieved\n"
                                         "  alphas: [1.0, 1.0, 1.0]\n")
    text = write_report(run_dir).read_text()
    assert "**Warning:**" not in text and "Every stage recorded the same config" in text
    assert dict(map(tuple, table_rows(text, "Files this report read"))) == {
        "retrieval/metrics.json": "verified", "finetune/summary.json": "verified", "ranking/metrics.json": "verified"}
    assert [r[0] for r in table_rows(text, "## How this run was built")] == ["retrieval", "finetune", "rank"]

    # the rank stage rebuilt with other candidates; then its metrics edited by hand
    from recranker_jax.run import write_marker

    write_marker(run_dir / "ranking", "key-2", 1.0, "0.1.0",
                 {**config, "rank": {"candidates": "sampled", "alphas": [1.0, 1.0, 1.0]}}, {})
    metrics = json.loads((run_dir / "ranking" / "metrics.json").read_text())
    metrics["splits"]["test"]["methods"]["hybrid"]["metrics"]["ndcg@1"] = 0.99
    (run_dir / "ranking" / "metrics.json").write_text(json.dumps(metrics))
    text = write_report(run_dir).read_text()
    assert ("**Warning:** ranking/metrics.json changed after the stage finished: the numbers below are not the ones "
            "its stage wrote.") in text
    assert text.index("**Warning:**") < text.index("## Split: test")
    assert "Note: the stages' recorded configs differ in 1 key(s): rank.candidates" in text
    rows = table_rows(text, "Where the recorded configs disagree")
    assert rows == [["rank.candidates", "`retrieved`", "`retrieved`", "`sampled`", "`retrieved`"]]
    files = dict(map(tuple, table_rows(text, "Files this report read")))
    assert files["ranking/metrics.json"] == "changed after the stage finished"
    assert files["retrieval/metrics.json"] == "verified"


def test_a_run_without_markers_says_nothing_was_verified(tmp_path):
    text = write_report(fake_run(tmp_path, "demo")).read_text()
    assert "No stage folder has a `_stage.json`: nothing here can be verified." in text
    assert "not verified (no _stage.json manifest in ranking/)" in text
