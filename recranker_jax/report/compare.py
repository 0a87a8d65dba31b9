"""The tables the CLI prints: one run's split (`format_table`) and several runs side by side
(`compare_runs`, `recranker report --runs`), each with its verdict."""

from __future__ import annotations

from pathlib import Path

from recranker_jax.report.tables import (
    EVERY_USER,
    candidate_set,
    difference_cell,
    display_name,
    label,
    load_ranking_metrics,
    markdown,
    metric_names,
    methods,
    p_value,
    read_json,
    signed,
    split_result,
    with_interval,
)
from recranker_jax.report.verdict import split_verdict, tuned_on
from recranker_jax.run import RunFolder


def format_table(metrics_json: dict, split: str = "test") -> str:
    """Plain-text table of one split: a row per method, mean [95% interval] per metric, then the tests."""
    result = split_result(metrics_json, split)
    names = metric_names(result)
    cells = {m: [with_interval(result["methods"][m]["metrics"].get(n), result["methods"][m]["intervals"].get(n))
                 for n in names] for m in methods(result)}
    width = max([len(label(n)) for n in names] + [len(c) for row in cells.values() for c in row]) + 2
    name_width = max(len(m) for m in cells) + 2
    lines = [f"{'method':<{name_width}}" + "".join(f"{label(n):>{width}}" for n in names)]
    lines += [f"{m:<{name_width}}" + "".join(f"{c:>{width}}" for c in row) for m, row in cells.items()]
    subset = " (a seeded sample: rank.sample_users)" if metrics_json.get("sample_users") else ""
    if (candidates := candidate_set(metrics_json)) in EVERY_USER:
        lines.append(f"{split}: {result['users']} users{subset}, {candidates} candidates ({EVERY_USER[candidates]})")
    else:
        lines.append(f"{split}: {result['users']} users{subset}, {result['hit_users']} with the held-out item among the candidates")
    for method in methods(result):
        paired = result["methods"][method].get("paired")
        if paired:
            tests = ", ".join(f"ΔNDCG@{k} {signed(paired[f'ndcg@{k}']['difference'])} "
                              f"p{p_value(paired[f'ndcg@{k}']['p_value']).replace(' ', '')}"
                              for k in result["ks"] if f"ndcg@{k}" in paired)
            lines.append(f"{method} vs {result['baseline']}: {tests}")
    return "\n".join(lines)


def backbone_of(run_dir: Path) -> str:
    """The retrieval backbone of a run (retrieval/metrics.json), or – when that file is absent."""
    path = RunFolder(run_dir).retrieval.metrics
    return str(read_json(path).get("backbone", "–")) if path.is_file() else "–"


def compare_runs(run_dirs: list[Path], split: str = "test") -> str:
    """Each run's verdict on `split`, then one markdown table, a row per (run, method), for
    ablations side by side: the backbone whose candidates a run re-ranked (its own order is the
    run's `backbone` row, the baseline of the paired test), and whether it used the retrieved
    candidates (the protocol) or planted or sampled ones."""
    run_dirs = [Path(d) for d in run_dirs]
    documents = [load_ranking_metrics(d) for d in run_dirs]
    results = [(d, split_result(m, split, str(RunFolder(d).ranking.metrics))) for d, m in zip(run_dirs, documents)]
    names_seen = [d.name for d in run_dirs]
    names: list[str] = []
    for _, result in results:
        names += [n for n in metric_names(result) if n not in names]
    names.sort(key=lambda n: (int(n.split("@")[1]), n.split("@")[0] != "hr"))
    first_k = int(names[0].split("@")[1])
    rows, verdicts = [], []
    for (run_dir, result), document in zip(results, documents):
        run = run_dir.name if names_seen.count(run_dir.name) == 1 else str(run_dir)
        backbone = backbone_of(run_dir)
        verdicts.append(f"- {run} ({split}): " + split_verdict(result, candidate_set(document), backbone,
                                                               document.get("sample_users"), tuned_on(document, split)))
        for method in methods(result):
            entry = result["methods"][method]
            test = entry.get("paired", {}).get(f"ndcg@{first_k}", {})
            rows.append([run, backbone, candidate_set(document), display_name(method), str(entry["conditional"]["users"])]
                        + [with_interval(entry["metrics"].get(n), entry["intervals"].get(n)) for n in names]
                        + [difference_cell(test)])
    table = markdown(["run", "backbone", "candidates", "method", "hit users"] + [label(n) for n in names]
                     + [f"ΔNDCG@{first_k} vs backbone (p)"], rows)
    return "\n".join(verdicts) + "\n\n" + table
