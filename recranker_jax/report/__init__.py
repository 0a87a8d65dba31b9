"""The run report: reads what the stages wrote into runs/<name>/ and writes report.md, its HTML
view report.html, metrics.json and plots/metrics.png. The report starts with its verdict in
plain words (did the LLM beat the backbone order, by how much, how many users could move),
then the plot, the tables (metrics with 95% intervals, conditional on a hit, paired tests,
answer rates), the training summary, and how the run was built (each stage's recorded config
and whether the files read are the ones their stage wrote); the config is linked.

    verdict.py     the verdict per split       tables.py      number formats, tables, notes
    plot.py        plots/metrics.png           provenance.py  _stage.json configs and manifests
    document.py    report.md, report.html      compare.py     the CLI's tables, `report --runs`
"""

from recranker_jax.report.compare import backbone_of, compare_runs, format_table
from recranker_jax.report.document import verdict_lines, write_report
from recranker_jax.report.plot import plot_metrics
from recranker_jax.report.tables import EVERY_USER, METHOD_ORDER, candidate_set, load_ranking_metrics
from recranker_jax.report.verdict import run_verdicts, split_verdict

__all__ = ["EVERY_USER", "METHOD_ORDER", "backbone_of", "candidate_set", "compare_runs", "format_table",
           "load_ranking_metrics", "plot_metrics", "run_verdicts", "split_verdict", "verdict_lines", "write_report"]
