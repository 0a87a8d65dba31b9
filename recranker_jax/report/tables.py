"""The run report: reads what the stages wrote into runs/<name>/ and writes report.md (metrics
with 95% intervals, conditional-on-hit metrics, paired tests, answer rates, timing, training
summary, config), metrics.json and plots/metrics.png; also the tables the CLI prints."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from recranker_jax.errors import RecRankerError
from recranker_jax.run import RunFolder

# The backbone order, the non-LLM controls (rank.baselines), then the LLM's methods.
METHOD_ORDER = ("backbone", "random", "transition", "lightgcn", "mf", "explicit_mf", "popularity",
                "pointwise", "pairwise", "listwise", "hybrid")
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecRankerError(f"{path}: not valid JSON ({err})") from None


def load_ranking_metrics(run_dir: Path) -> dict:
    """runs/<name>/ranking/metrics.json, or a RecRankerError saying to run the rank stage."""
    path = RunFolder(Path(run_dir)).ranking.metrics
    if not path.is_file():
        raise RecRankerError(f"run folder {run_dir} has no ranking/metrics.json; run `recranker rank` for it first")
    return _read_json(path)


def candidate_set(metrics_json: dict) -> str:
    """Which candidates a run ranked: retrieved (the RecRanker protocol), planted or sampled."""
    return metrics_json.get("candidates", "retrieved")


def _baselines_note(metrics_json: dict) -> list[str]:
    names = metrics_json.get("baselines") or []
    if not names:
        return []
    fixed = {"transition": ("transition (item-to-item transitions among training likes, window 5, summed from "
                            "the user's last 10 likes; the backbone order breaks ties)"),
             "random": "random (a seeded random order: what re-ranking without any information scores)"}
    described = [fixed.get(n, f"{n} ({n}'s own scores of the same candidates)") for n in names]
    return [f"Non-LLM controls, re-ordering the same candidates without the LLM: {'; '.join(described)}.", ""]


def _split(metrics_json: dict, split: str, source: str = "ranking metrics") -> dict:
    splits = metrics_json.get("splits", {})
    if split not in splits:
        raise RecRankerError(f"{source}: no split {split!r}; available: {', '.join(splits) or 'none'}")
    return splits[split]


def _methods(result: dict) -> list[str]:
    present = list(result["methods"])
    return [m for m in METHOD_ORDER if m in present] + [m for m in present if m not in METHOD_ORDER]


def _metric_names(result: dict) -> list[str]:
    return [f"{metric}@{k}" for k in result["ks"] for metric in ("hr", "ndcg")]


def _label(name: str) -> str:
    metric, k = name.split("@")
    return f"{'HR' if metric == 'hr' else 'NDCG'}@{k}"


def _value(x: float | None, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _signed(x: float | None) -> str:
    return "–" if x is None else f"{x:+.4f}"


def _with_interval(mean: float | None, interval: list | None) -> str:
    if mean is None:
        return "–"
    if not interval or interval[0] is None:
        return _value(mean)
    return f"{_value(mean)} [{_value(interval[0])}, {_value(interval[1])}]"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _metrics_table(result: dict, conditional: bool = False) -> str:
    names = _metric_names(result)
    rows = []
    for method in _methods(result):
        entry = result["methods"][method]
        block = entry["conditional"] if conditional else entry
        rows.append([method] + [_with_interval(block["metrics"].get(n), block["intervals"].get(n)) for n in names])
    return _markdown(["method"] + [_label(n) for n in names], rows)


def _paired_table(result: dict) -> str:
    ks = result["ks"]
    rows = []
    for method in _methods(result):
        paired = result["methods"][method].get("paired")
        if paired is None:
            continue
        cells = []
        for k in ks:
            test = paired.get(f"ndcg@{k}", {})
            difference = test.get("difference")
            cells.append("–" if difference is None else f"{_signed(difference)} (p = {_value(test.get('p_value'), 3)})")
        rows.append([f"{method} vs {result['baseline']}"] + cells)
    if not rows:
        return "(no method besides the baseline)"
    return _markdown(["comparison"] + [f"ΔNDCG@{k} (p)" for k in ks], rows)


def _rates_table(rates: dict) -> str:
    rows = [[task, _value(r.get("unreadable")), _value(r.get("inconsistent"))] for task, r in rates.items()]
    return _markdown(["task", "unreadable", "inconsistent"], rows) if rows else "(not recorded)"


def _key_value_table(data: dict) -> str:
    rows = [[str(k), _value(v) if isinstance(v, float) else str(v)] for k, v in data.items()
            if not isinstance(v, (dict, list))]
    return _markdown(["key", "value"], rows)


def _retrieval_section(retrieval: dict) -> list[str]:
    lines = [(f"Backbone: {retrieval.get('backbone', '?')}, top-{retrieval.get('candidates', '?')} candidates. "
              "Test split, full catalogue, training items masked.")]
    models = retrieval.get("models", {})
    columns = [c for c in RETRIEVAL_COLUMNS if any(c in m.get("test", {}) for m in models.values())]
    if columns:
        rows = [[name] + [_value(entry.get("test", {}).get(c)) for c in columns] for name, entry in models.items()]
        lines += ["", _markdown(["model"] + columns, rows)]
    return lines


def _split_section(name: str, result: dict, candidates: str = "retrieved") -> list[str]:
    who = (f"{result['users']} users, all with the held-out item among the candidates ({EVERY_USER[candidates]})."
           if candidates in EVERY_USER else
           f"{result['users']} users; {result['hit_users']} have the held-out item among the candidates "
           "(every other user is a miss whatever the re-ranker does).")
    if candidates == "planted" and result.get("held_out_last") is not None:
        who += (f" The backbone order puts the held-out item last for {result['held_out_last']} of them (for the "
                "others it is among the backbone's top k-1), so a re-ranker gains against the backbone order merely "
                "by disagreeing with it: compare with the random order.")
    lines = [
        f"## Split: {name}" + (f" ({candidates} evaluation)" if candidates in EVERY_USER else ""),
        "",
        f"{who} Intervals: 95% percentile bootstrap over users ({result.get('bootstrap', '?')} resamples).",
        "",
        _metrics_table(result),
        "",
        f"### Conditional on a hit in the candidates ({result['hit_users']} users)",
        "",
        _metrics_table(result, conditional=True),
        "",
        f"### Paired sign-flip permutation test on per-user NDCG vs {result['baseline']}",
        "",
        _paired_table(result),
        "",
        "### LLM answers",
        "",
        (f"Scored users: {result.get('scored_users', '–')}; seconds per scored item: "
         f"{'–' if result.get('seconds_per_item') is None else format(result['seconds_per_item'], '.4g')}."),
        "",
        _rates_table(result.get("rates", {})),
        "",
    ]
    return lines


def plot_metrics(result: dict, path: Path, title: str = "") -> None:
    """Grouped bars: one panel per metric (HR, NDCG), groups by k, a bar per method, 95% intervals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = _methods(result)
    ks = result["ks"]
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)  # render off-screen with Agg, whatever the process's pyplot backend
    axes = figure.subplots(1, 2)
    width = 0.8 / max(len(methods), 1)
    for axis, metric in zip(axes, ("hr", "ndcg")):
        for i, method in enumerate(methods):
            entry = result["methods"][method]
            means, lows, highs = [], [], []
            for k in ks:
                mean = entry["metrics"].get(f"{metric}@{k}")
                low, high = entry["intervals"].get(f"{metric}@{k}") or (None, None)
                mean = 0.0 if mean is None else mean
                means.append(mean)
                lows.append(0.0 if low is None else max(mean - low, 0.0))
                highs.append(0.0 if high is None else max(high - mean, 0.0))
            positions = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(ks))]
            axis.bar(positions, means, width, yerr=[lows, highs], capsize=3, label=method)
        axis.set_xticks(range(len(ks)), [f"@{k}" for k in ks])
        axis.set_title(f"{metric.upper()}@k (95% bootstrap interval)")
        axis.set_ylim(bottom=0)
    axes[0].legend(fontsize="small")
    if title:
        figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def write_report(run_dir: Path) -> Path:
    """Write report.md, metrics.json and plots/metrics.png into `run_dir`; returns report.md's path."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    ranking = load_ranking_metrics(run_dir)
    splits = ranking.get("splits", {})
    if not splits:
        raise RecRankerError(f"{run.ranking.metrics}: no splits; run `recranker rank` again")
    lines = [f"# RecRanker report: {run_dir.name}", ""]
    candidates = candidate_set(ranking)
    what = (f"the {candidates} evaluation, not the RecRanker protocol" if candidates in EVERY_USER
            else "retrieve-top-k-then-re-rank (the RecRanker protocol)")
    who = (f"a seeded random sample of {ranking['sample_users']} users (rank.sample_users)" if ranking.get("sample_users")
           else "all users")
    lines.append(f"Re-ranking mode: {ranking.get('mode', '?')}. Candidates: {candidates}. HR@k and NDCG@k of {what} "
                 f"over {who}; NDCG@k = 1 / log2(rank + 1) for a hit at rank <= k.")
    tuned = ranking.get("tuned_alphas")
    if tuned:
        lines.append(f"Hybrid weights (pointwise, pairwise, listwise): {tuned['alphas']}, chosen on the validation item "
                     f"({tuned['metric']}, each weight from {tuned['grid']}); the test item did not decide them.")
    lines.append("")
    lines += _baselines_note(ranking)
    if run.retrieval.metrics.is_file():
        lines += ["## Retrieval", ""] + _retrieval_section(_read_json(run.retrieval.metrics)) + [""]
    ordered = [s for s in ("test", "valid") if s in splits] + [s for s in splits if s not in ("test", "valid")]
    for split in ordered:
        lines += _split_section(split, splits[split], candidates)
    if run.finetune.summary.is_file():
        lines += ["## Instruction tuning", "", _key_value_table(_read_json(run.finetune.summary)), ""]
    lines += ["## Config", ""]
    lines += (["```yaml", run.config.read_text(encoding="utf-8").rstrip(), "```"] if run.config.is_file()
              else ["(no config.yaml)"])
    run.report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copyfile(run.ranking.metrics, run.metrics)
    plot_metrics(splits[ordered[0]], run.plots / "metrics.png",
                 f"{run_dir.name}: {ordered[0]} split, {splits[ordered[0]]['users']} users, {candidates} candidates")
    return run.report


def format_table(metrics_json: dict, split: str = "test") -> str:
    """Plain-text table of one split: a row per method, mean [95% interval] per metric, then the tests."""
    result = _split(metrics_json, split)
    names = _metric_names(result)
    cells = {m: [_with_interval(result["methods"][m]["metrics"].get(n), result["methods"][m]["intervals"].get(n))
                 for n in names] for m in _methods(result)}
    width = max([len(_label(n)) for n in names] + [len(c) for row in cells.values() for c in row]) + 2
    name_width = max(len(m) for m in cells) + 2
    lines = [f"{'method':<{name_width}}" + "".join(f"{_label(n):>{width}}" for n in names)]
    lines += [f"{m:<{name_width}}" + "".join(f"{c:>{width}}" for c in row) for m, row in cells.items()]
    subset = " (a seeded sample: rank.sample_users)" if metrics_json.get("sample_users") else ""
    if (candidates := candidate_set(metrics_json)) in EVERY_USER:
        lines.append(f"{split}: {result['users']} users{subset}, {candidates} candidates ({EVERY_USER[candidates]})")
    else:
        lines.append(f"{split}: {result['users']} users{subset}, {result['hit_users']} with the held-out item among the candidates")
    for method in _methods(result):
        paired = result["methods"][method].get("paired")
        if paired:
            tests = ", ".join(f"ΔNDCG@{k} {_signed(paired[f'ndcg@{k}']['difference'])} p={_value(paired[f'ndcg@{k}']['p_value'], 3)}"
                              for k in result["ks"] if f"ndcg@{k}" in paired)
            lines.append(f"{method} vs {result['baseline']}: {tests}")
    return "\n".join(lines)


def backbone_of(run_dir: Path) -> str:
    """The retrieval backbone of a run (retrieval/metrics.json), or – when that file is absent."""
    path = RunFolder(run_dir).retrieval.metrics
    return str(_read_json(path).get("backbone", "–")) if path.is_file() else "–"


def compare_runs(run_dirs: list[Path], split: str = "test") -> str:
    """One markdown table, a row per (run, method), for ablations side by side: the backbone
    whose candidates a run re-ranked (its own order is the run's `backbone` row, the baseline
    of the paired test), and whether it used the retrieved candidates (the protocol) or
    planted or sampled ones."""
    run_dirs = [Path(d) for d in run_dirs]
    documents = [load_ranking_metrics(d) for d in run_dirs]
    results = [(d, _split(m, split, str(RunFolder(d).ranking.metrics))) for d, m in zip(run_dirs, documents)]
    names_seen = [d.name for d in run_dirs]
    names: list[str] = []
    for _, result in results:
        names += [n for n in _metric_names(result) if n not in names]
    names.sort(key=lambda n: (int(n.split("@")[1]), n.split("@")[0] != "hr"))
    first_k = int(names[0].split("@")[1])
    rows = []
    for (run_dir, result), document in zip(results, documents):
        run = run_dir.name if names_seen.count(run_dir.name) == 1 else str(run_dir)
        for method in _methods(result):
            entry = result["methods"][method]
            test = entry.get("paired", {}).get(f"ndcg@{first_k}", {})
            paired = ("–" if test.get("difference") is None
                      else f"{_signed(test['difference'])} (p = {_value(test.get('p_value'), 3)})")
            rows.append([run, backbone_of(run_dir), candidate_set(document), method, str(entry["conditional"]["users"])]
                        + [_with_interval(entry["metrics"].get(n), entry["intervals"].get(n)) for n in names]
                        + [paired])
    return _markdown(["run", "backbone", "candidates", "method", "hit users"] + [_label(n) for n in names]
                     + [f"ΔNDCG@{first_k} vs backbone (p)"], rows)
