"""`recranker bench compare A.json B.json ...`: benchmark result files side by side, each
metric also as a ratio to the first file.

The result file schema (what `recranker bench all` writes; one file per machine and run):

    {
      "environment": {...},          # hardware.environment(): device_kind, device_count,
                                     # process_count, platform, jax, jaxlib, flax, python, ...
      "results": {                   # benchmark name -> its metrics
        "<benchmark>": {"<metric>": <number>, ...},
        ...                          # e.g. "finetune-7b-lora": {"tokens_per_second": 5210.0, "mfu": 0.41}
      },
      ...                            # any other top-level keys (config, date) are allowed and ignored
    }

Metric names say their unit (tokens_per_second, items_per_second, epoch_seconds, mfu as a
fraction, peak_memory_gb). Only numbers are compared; other values (a backend name, a note)
are skipped. Columns are labelled "<device_kind> x<device_count>"; rows are
"<benchmark>.<metric>" in order of first appearance; a missing entry shows as '-'.

`plot_comparison` draws the same rows as a PNG, one panel per metric and a bar per file; a
benchmark's `jax_<metric>` and `torch_<metric>`, and the variants of `<benchmark>/jax-...` and
`<benchmark>/torch-...`, share one panel (JAX vs PyTorch, side by side).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recranker_jax.errors import RecRankerError


def load_result(path: str | Path) -> dict[str, Any]:
    """Read and check one result file; RecRankerError naming the file when it is not one."""
    path = Path(path)

    def bad(why: str) -> RecRankerError:
        return RecRankerError(f"bench result {path}: {why}; expected a JSON object with 'environment' and 'results' "
                              "(as written by recranker bench)")

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecRankerError(f"bench result {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad("not valid JSON") from None
    if not isinstance(doc, dict):
        raise bad("the top level is not an object")
    if not isinstance(doc.get("environment"), dict):
        raise bad("no 'environment' object")
    results = doc.get("results")
    if not isinstance(results, dict) or not all(isinstance(v, dict) for v in results.values()):
        raise bad("'results' is not an object of benchmark name -> metrics object")
    return doc


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def label(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    return f"{env.get('device_kind', '?')} x{env.get('device_count', '?')}"


def compare(docs: Sequence[dict[str, Any]]) -> tuple[list[str], list[tuple[str, list[float | None], list[float | None]]]]:
    """(column labels, rows); each row is (benchmark.metric, value per file or None, ratio to the
    first file per file or None when either side is missing or the first is 0)."""
    names: list[str] = []
    for doc in docs:
        for bench, metrics in doc["results"].items():
            for metric, value in metrics.items():
                key = f"{bench}.{metric}"
                if _is_number(value) and key not in names:
                    names.append(key)
    rows = []
    for key in names:
        bench, _, metric = key.partition(".")
        values = []
        for doc in docs:
            value = doc["results"].get(bench, {}).get(metric)
            values.append(float(value) if _is_number(value) else None)
        first = values[0]
        ratios = [None if v is None or first is None or first == 0 else v / first for v in values]
        rows.append((key, values, ratios))
    return [label(doc) for doc in docs], rows


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 1 or value == 0:
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return f"{value:.4g}"


def format_comparison(paths: Sequence[str | Path]) -> str:
    """The side-by-side table of the files at `paths` (ratios against the first)."""
    if not paths:
        raise RecRankerError("bench compare: expected at least one result file")
    docs = [load_result(p) for p in paths]
    labels, rows = compare(docs)
    labels = [f"{text} ({Path(p).stem})" if labels.count(text) > 1 else text for text, p in zip(labels, paths)]
    header = ["benchmark.metric", labels[0]] + [f"{text} (/first)" for text in labels[1:]]
    table = [header]
    for key, values, ratios in rows:
        cells = [key, _number(values[0])]
        for value, ratio in zip(values[1:], ratios[1:]):
            cells.append(_number(value) if ratio is None else f"{_number(value)} (x{ratio:.2f})")
        table.append(cells)
    if not rows:
        return "no numeric metrics in these files"
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


SIDES = {"jax_": "JAX", "torch_": "PyTorch"}  # metric prefixes of the two sides of a benchmark
VARIANT_PREFIXES = ("jax-", "torch-")  # a benchmark's last part naming a side's variant (retrieval/quickstart/jax-edges)


def side_colour(side: str) -> str:
    """JAX sides orange, PyTorch sides grey, anything else blue."""
    if side.lower().startswith("jax"):
        return "#e6550d"
    return "#636363" if side.lower().startswith(("torch", "pytorch")) else "#3182bd"


def panels(labels: Sequence[str], rows) -> dict[str, list[tuple[str, str, float]]]:
    """Rows of `compare` grouped into plot panels, "benchmark.metric" -> [(file label, side, value)]
    for every value present, in file order: a metric's `jax_` / `torch_` prefix and a benchmark's
    last part `jax-...` / `torch-...` (its variant) become the bar's side, so both sides share a panel."""
    grouped: dict[str, list[tuple[str, str, float]]] = {}
    for key, values, _ in rows:
        bench, _, metric = key.partition(".")
        parent, _, last = bench.rpartition("/")
        prefix = next((p for p in SIDES if metric.startswith(p)), "")
        if prefix:
            panel, side = f"{bench}.{metric.removeprefix(prefix)}", SIDES[prefix]
        elif parent and last.startswith(VARIANT_PREFIXES):
            panel, side = f"{parent}.{metric}", last
        else:
            panel, side = key, ""
        bars = grouped.setdefault(panel, [])
        bars.extend((text, side, value) for text, value in zip(labels, values) if value is not None)
    order = {text: i for i, text in enumerate(labels)}
    for bars in grouped.values():
        sides = list(dict.fromkeys(side for _, side, _ in bars))
        bars.sort(key=lambda bar: (order[bar[0]], sides.index(bar[1])))
    return grouped


def plot_comparison(paths: Sequence[str | Path], out: str | Path):
    """The files at `paths` as a PNG at `out` (`panels`: one per metric, a bar per file and side,
    its value written on it); returns the matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    docs = [load_result(p) for p in paths]
    labels, rows = compare(docs)
    labels = [f"{text} ({Path(p).stem})" if labels.count(text) > 1 else text for text, p in zip(labels, paths)]
    grouped = panels(labels, rows)
    if not grouped:
        raise RecRankerError("bench compare: no numeric metrics in these files to plot")
    columns = min(3, len(grouped))
    lines = -(-len(grouped) // columns)
    height = max(len(bars) for bars in grouped.values())
    figure = Figure(figsize=(5 * columns, (0.9 + 0.35 * height) * lines + 0.6), layout="constrained")
    FigureCanvasAgg(figure)  # off-screen, whatever the process's pyplot backend
    axes = figure.subplots(lines, columns, squeeze=False).flat
    for axis, (panel, bars) in zip(axes, grouped.items()):
        names = [f"{text} {side}".strip() for text, side, _ in bars]
        values = [value for _, _, value in bars]
        positions = range(len(bars))[::-1]
        axis.barh(list(positions), values, color=[side_colour(side) for _, side, _ in bars])
        axis.set_yticks(list(positions), names, fontsize="small")
        for position, value in zip(positions, values):
            axis.text(value, position, f" {_number(value)}", va="center", fontsize="x-small")
        axis.set_title(panel, fontsize="small")
        axis.set_xlim(0, max(max(values), 1e-12) * 1.3 if min(values) >= 0 else None)
        axis.tick_params(axis="x", labelsize="x-small")
    for axis in figure.axes[len(grouped):]:
        axis.set_visible(False)
    figure.suptitle("recranker bench: " + " vs ".join(labels), fontsize="medium")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return figure


def default_plot_path(paths: Sequence[str | Path]) -> Path:
    """Where `bench compare` writes its PNG by default: beside the first file, `<stem>-compare.png`
    (`bench all --out X.json` writes X.png)."""
    first = Path(paths[0])
    return first.with_name(f"{first.stem}-compare.png")
