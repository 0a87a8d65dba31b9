"""The report's tables: metrics with intervals, paired tests, answer rates, retrieval, and the
notes that say which columns cannot differ by construction. One number format for every table
and for the verdict, so the two always agree."""

from __future__ import annotations

import json
import math
from pathlib import Path

from recranker_jax.errors import RecRankerError
from recranker_jax.run import RunFolder

# The backbone order, the non-LLM controls (rank.baselines), then the LLM's methods.
METHOD_ORDER = ("backbone", "random", "transition", "lightgcn", "mf", "explicit_mf", "popularity",
                "pointwise", "pairwise", "listwise", "hybrid")
LLM_METHODS = ("pointwise", "pairwise", "listwise", "hybrid")
MISSING = "–"  # a value that was not measured (e.g. MFU on a device with no known peak) or does not apply
# The evaluations where every user's candidates hold the held-out item (rank.candidates), described.
EVERY_USER = {
    "planted": ("planted evaluation: each user's candidates are the backbone's best other items plus the held-out "
                "item, in backbone score order, so every user counts (not the RecRanker protocol; the backbone order "
                "keeps its protocol HR@j and NDCG@j below the last position)"),
    "sampled": ("sampled evaluation: each user's candidates are the held-out item plus items the user never rated, "
                "drawn uniformly, in backbone score order, so every user counts and the backbone order is a real "
                "baseline (not the RecRanker protocol)"),
}
RETRIEVAL_COLUMNS = ("recall@10", "ndcg@10", "hr@10", "protocol_hr@3", "protocol_ndcg@3", "protocol_hr@5", "protocol_ndcg@5")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecRankerError(f"{path}: not valid JSON ({err})") from None


def load_ranking_metrics(run_dir: Path) -> dict:
    """runs/<name>/ranking/metrics.json, or a RecRankerError saying to run the rank stage."""
    path = RunFolder(Path(run_dir)).ranking.metrics
    if not path.is_file():
        raise RecRankerError(f"run folder {run_dir} has no ranking/metrics.json; run `recranker rank` for it first")
    return read_json(path)


def candidate_set(metrics_json: dict) -> str:
    """Which candidates a run ranked: retrieved (the RecRanker protocol), planted or sampled."""
    return metrics_json.get("candidates", "retrieved")


def split_result(metrics_json: dict, split: str, source: str = "ranking metrics") -> dict:
    splits = metrics_json.get("splits", {})
    if split not in splits:
        raise RecRankerError(f"{source}: no split {split!r}; available: {', '.join(splits) or 'none'}")
    return splits[split]


def ordered_splits(splits: dict) -> list[str]:
    return [s for s in ("test", "valid") if s in splits] + [s for s in splits if s not in ("test", "valid")]


def methods(result: dict) -> list[str]:
    present = list(result["methods"])
    return [m for m in METHOD_ORDER if m in present] + [m for m in present if m not in METHOD_ORDER]


def metric_names(result: dict) -> list[str]:
    return [f"{metric}@{k}" for k in result["ks"] for metric in ("hr", "ndcg")]


def label(name: str) -> str:
    metric, k = name.split("@")
    return f"{'HR' if metric == 'hr' else 'NDCG'}@{k}"


def number(x: float | None, digits: int = 4) -> str:
    return MISSING if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def signed(x: float | None) -> str:
    return MISSING if x is None else f"{x:+.4f}"


def p_value(p: float | None) -> str:
    """A p-value as the tables and the verdict print it: three decimals, or < 0.001."""
    if p is None:
        return MISSING
    return "< 0.001" if p < 0.0005 else f"= {p:.3f}"


def difference_cell(test: dict) -> str:
    """A paired test's cell: `+0.0012 (p = 0.825)`."""
    if test.get("difference") is None:
        return MISSING
    return f"{signed(test['difference'])} (p {p_value(test.get('p_value'))})"


def with_interval(mean: float | None, interval: list | None) -> str:
    if mean is None:
        return MISSING
    if not interval or interval[0] is None:
        return number(mean)
    return f"{number(mean)} [{number(interval[0])}, {number(interval[1])}]"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def constant_by_construction(result: dict, n_candidates: int | None) -> list[str]:
    """The metric columns no re-ranker can change: HR@k for k at least the number of candidates
    (every order of the same candidates holds the same items in its top k). Without a known
    candidate count, the HR@k columns where every method has every hit user in its top k."""
    names = []
    for k in result["ks"]:
        if n_candidates is not None:
            if k >= n_candidates:
                names.append(f"hr@{k}")
            continue
        entries = [result["methods"][m]["conditional"]["metrics"].get(f"hr@{k}") for m in methods(result)]
        if entries and all(v == 1.0 for v in entries):
            names.append(f"hr@{k}")
    return names


def construction_note(result: dict, n_candidates: int | None) -> list[str]:
    constant = constant_by_construction(result, n_candidates)
    if not constant:
        return []
    columns = ", ".join(label(n) for n in constant)
    size = f"{n_candidates} candidates" if n_candidates is not None else "the candidates"
    return [f"Note: {columns} is the same for every method by construction: a re-ranker of {size} keeps the same "
            "items in its top k, only their order changes. Compare the methods on the other columns.", ""]


def metrics_table(result: dict, conditional: bool = False) -> str:
    names = metric_names(result)
    rows = []
    for method in methods(result):
        entry = result["methods"][method]
        block = entry["conditional"] if conditional else entry
        rows.append([display_name(method)] + [with_interval(block["metrics"].get(n), block["intervals"].get(n))
                                              for n in names])
    return markdown(["method"] + [label(n) for n in names], rows)


def display_name(method: str) -> str:
    """A method's row label: the LLM's tasks as they are, the others marked as what they are."""
    if method == "backbone" or method in LLM_METHODS:
        return method
    return f"{method} (control)"


def paired_table(result: dict) -> str:
    rows = []
    for method in methods(result):
        paired = result["methods"][method].get("paired")
        if paired is None:
            continue
        rows.append([f"{display_name(method)} vs {result['baseline']}"]
                    + [difference_cell(paired.get(f"ndcg@{k}", {})) for k in result["ks"]])
    if not rows:
        return "(no method besides the baseline)"
    return markdown(["comparison"] + [f"ΔNDCG@{k} (p)" for k in result["ks"]], rows)


def rates_table(rates: dict) -> str:
    rows = [[task, number(r.get("unreadable")), number(r.get("inconsistent"))] for task, r in rates.items()]
    return markdown(["task", "unreadable", "inconsistent"], rows) if rows else "(not recorded)"


def key_value_table(data: dict, notes: dict[str, str] | None = None) -> str:
    """Scalars of a summary: None as `–`, with the reason from `notes` where one is known."""
    notes = notes or {}
    rows = []
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            continue
        if value is None:
            text = MISSING + (f" ({notes[key]})" if key in notes else " (not recorded)")
        else:
            text = number(value) if isinstance(value, float) else str(value)
        rows.append([str(key), text])
    return markdown(["key", "value"], rows)


def retrieval_section(retrieval: dict) -> list[str]:
    lines = [(f"Backbone: {retrieval.get('backbone', '?')}, top-{retrieval.get('candidates', '?')} candidates. "
              "Test split, full catalogue, training items masked.")]
    models = retrieval.get("models", {})
    columns = [c for c in RETRIEVAL_COLUMNS if any(c in m.get("test", {}) for m in models.values())]
    if columns:
        rows = [[name] + [number(entry.get("test", {}).get(c)) for c in columns] for name, entry in models.items()]
        lines += ["", markdown(["model"] + columns, rows)]
    return lines
