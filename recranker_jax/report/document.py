"""report.md (and report.html beside it): the verdict first, then the plot, the tables with
their notes, the training summary, and how the run was built; the config is linked, not pasted."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

from recranker_jax.errors import RecRankerError
from recranker_jax.report.plot import plot_metrics
from recranker_jax.report.provenance import provenance_section
from recranker_jax.report.tables import (
    EVERY_USER,
    candidate_set,
    construction_note,
    key_value_table,
    load_ranking_metrics,
    metrics_table,
    ordered_splits,
    paired_table,
    rates_table,
    read_json,
    retrieval_section,
)
from recranker_jax.report.verdict import RULE, run_verdicts
from recranker_jax.run import RunFolder

PLOT = "plots/metrics.png"
# Why a training summary value can be missing.
SUMMARY_NOTES = {
    "median_mfu": "MFU needs the device's peak FLOP/s, known for TPUs and A100 / H100 / H200, not for a CPU",
    "median_tokens_per_second": "fewer than two steps ran in the call that finished the stage",
    "first_loss": "no step ran in the call that finished the stage (it resumed at its last step)",
    "last_loss": "no step ran in the call that finished the stage (it resumed at its last step)",
}


def _baselines_note(metrics_json: dict) -> list[str]:
    names = metrics_json.get("baselines") or []
    if not names:
        return []
    fixed = {"transition": ("transition (item-to-item transitions among training likes, window 5, summed from "
                            "the user's last 10 likes; the backbone order breaks ties)"),
             "random": "random (a seeded random order: what re-ranking without any information scores)"}
    described = [fixed.get(n, f"{n} ({n}'s own scores of the same candidates)") for n in names]
    return [f"Non-LLM controls, re-ordering the same candidates without the LLM: {'; '.join(described)}.", ""]


def _split_section(name: str, result: dict, candidates: str, n_candidates: int | None) -> list[str]:
    who = (f"{result['users']} users, all with the held-out item among the candidates ({EVERY_USER[candidates]})."
           if candidates in EVERY_USER else
           f"{result['users']} users; {result['hit_users']} have the held-out item among the candidates "
           "(every other user is a miss whatever the re-ranker does).")
    if candidates == "planted" and result.get("held_out_last") is not None:
        who += (f" The backbone order puts the held-out item last for {result['held_out_last']} of them (for the "
                "others it is among the backbone's top k-1), so a re-ranker gains against the backbone order merely "
                "by disagreeing with it: compare with the random order.")
    seconds = result.get("seconds_per_item")
    return [
        f"## Split: {name}" + (f" ({candidates} evaluation)" if candidates in EVERY_USER else ""),
        "",
        f"{who} Intervals: 95% percentile bootstrap over users ({result.get('bootstrap', '?')} resamples).",
        "",
        metrics_table(result),
        "",
        *construction_note(result, n_candidates),
        f"### Conditional on a hit in the candidates ({result['hit_users']} users)",
        "",
        metrics_table(result, conditional=True),
        "",
        *construction_note(result, n_candidates),
        f"### Paired sign-flip permutation test on per-user NDCG vs {result['baseline']}",
        "",
        paired_table(result),
        "",
        "### LLM answers",
        "",
        (f"Scored users: {result.get('scored_users', '–')}; seconds per scored item: "
         f"{'–' if seconds is None else format(seconds, '.4g')}. Rates are shares of the LLM's answers "
         "(– : the task has no such rate)."),
        "",
        rates_table(result.get("rates", {})),
        "",
    ]


def _evaluation_lines(ranking: dict) -> list[str]:
    candidates = candidate_set(ranking)
    what = (f"the {candidates} evaluation, not the RecRanker protocol" if candidates in EVERY_USER
            else "retrieve-top-k-then-re-rank (the RecRanker protocol)")
    who = (f"a seeded random sample of {ranking['sample_users']} users (rank.sample_users)" if ranking.get("sample_users")
           else "all users")
    lines = [f"Re-ranking mode: {ranking.get('mode', '?')}. Candidates: {candidates}. HR@k and NDCG@k of {what} "
             f"over {who}; NDCG@k = 1 / log2(rank + 1) for a hit at rank <= k."]
    tuned = ranking.get("tuned_alphas")
    if tuned:
        lines.append(f"Hybrid weights (pointwise, pairwise, listwise): {tuned['alphas']}, chosen on the validation item "
                     f"({tuned['metric']}, each weight from {tuned['grid']}); the test item did not decide them.")
    return lines + [""] + _baselines_note(ranking)


def verdict_lines(run_dir: Path) -> list[str]:
    """The verdict of a run, one line per split (`test: ...`), as the CLI prints it."""
    run = RunFolder(Path(run_dir))
    retrieval = read_json(run.retrieval.metrics) if run.retrieval.metrics.is_file() else {}
    return [f"{split}: {text}" for split, text in run_verdicts(load_ranking_metrics(run_dir), retrieval.get("backbone"))]


def write_report(run_dir: Path) -> Path:
    """Write report.md, report.html, metrics.json and plots/metrics.png into `run_dir`; returns report.md's path."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    ranking = load_ranking_metrics(run_dir)
    splits = ranking.get("splits", {})
    if not splits:
        raise RecRankerError(f"{run.ranking.metrics}: no splits; run `recranker rank` again")
    retrieval = read_json(run.retrieval.metrics) if run.retrieval.metrics.is_file() else None
    backbone = (retrieval or {}).get("backbone")
    n_candidates = (retrieval or {}).get("candidates")  # k, under every rank.candidates
    candidates = candidate_set(ranking)
    warnings, provenance = provenance_section(run)

    lines = [f"# RecRanker report: {run_dir.name}", "", "## Verdict", "", RULE, ""]
    for split, text in run_verdicts(ranking, backbone):
        lines += [f"- **{split}**: {text}"]
    lines += [""] + [w + "\n" for w in warnings]
    lines += [f"![HR@k and NDCG@k per method, 95% intervals]({PLOT})", "", "## How it was evaluated", ""]
    lines += _evaluation_lines(ranking)
    if retrieval is not None:
        lines += ["## Retrieval", ""] + retrieval_section(retrieval) + [""]
    ordered = ordered_splits(splits)
    for split in ordered:
        lines += _split_section(split, splits[split], candidates, n_candidates)
    if run.finetune.summary.is_file():
        lines += ["## Instruction tuning", "", key_value_table(read_json(run.finetune.summary), SUMMARY_NOTES), ""]
    lines += provenance
    lines += ["## Config", "",
              (f"The run's config is [config.yaml](config.yaml); `recranker config show --config {run.config}` prints "
               "it with each key's meaning." if run.config.is_file() else "(no config.yaml)"), ""]
    text = "\n".join(lines).rstrip() + "\n"
    run.report.write_text(text, encoding="utf-8")
    shutil.copyfile(run.ranking.metrics, run.metrics)
    first = ordered[0]
    plot_metrics(splits[first], run.plots / "metrics.png",
                 f"{run_dir.name}: {first} split, {candidates} candidates", candidates)
    write_html(text, run_dir / "report.html", run.plots / "metrics.png", f"RecRanker report: {run_dir.name}")
    return run.report


def write_html(markdown_text: str, path: Path, plot: Path, title: str) -> bool:
    """report.html: the markdown rendered by markdown-it-py (CommonMark and tables), the plot
    embedded as a data URI so the file stands alone; False (and no file) without the library."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return False
    body = MarkdownIt("commonmark").enable("table").render(markdown_text)
    if plot.is_file():
        data = base64.b64encode(plot.read_bytes()).decode("ascii")
        body = body.replace(f'src="{PLOT}"', f'src="data:image/png;base64,{data}"')
    style = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:2px 8px}"
             "img{max-width:100%}")
    path.write_text(f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
                    f"<style>{style}</style></head>\n<body>\n{body}</body></html>\n", encoding="utf-8")
    return True
