"""plots/metrics.png: HR@k and NDCG@k per method with 95% intervals. The backbone order is
dark grey, the non-LLM controls light grey and hatched, the LLM's methods one orange family,
and the subtitle says how many users could move at all."""

from __future__ import annotations

from pathlib import Path

from recranker_jax.report.tables import LLM_METHODS, EVERY_USER, methods

BACKBONE_COLOUR = "#404040"
CONTROL_COLOURS = ("#c8c8c8", "#a0a0a0", "#e0e0e0", "#b4b4b4")
CONTROL_HATCH = "//"


def method_kind(method: str, baseline: str = "backbone") -> str:
    """backbone, control (a non-LLM re-ranker) or llm."""
    if method == baseline:
        return "backbone"
    return "llm" if method in LLM_METHODS else "control"


def bar_styles(method_names: list[str], baseline: str = "backbone") -> dict[str, dict]:
    """method -> {kind, label, color, hatch}: one colour family per kind."""
    from matplotlib import colormaps

    llm = [m for m in method_names if method_kind(m, baseline) == "llm"]
    controls = [m for m in method_names if method_kind(m, baseline) == "control"]
    oranges = colormaps["Oranges"]
    styles = {}
    for method in method_names:
        kind = method_kind(method, baseline)
        if kind == "backbone":
            styles[method] = {"kind": kind, "label": f"{method} order", "color": BACKBONE_COLOUR, "hatch": None}
        elif kind == "control":
            colour = CONTROL_COLOURS[controls.index(method) % len(CONTROL_COLOURS)]
            styles[method] = {"kind": kind, "label": f"{method} (non-LLM control)", "color": colour,
                              "hatch": CONTROL_HATCH}
        else:
            shade = 0.4 + 0.5 * (llm.index(method) / max(len(llm) - 1, 1))
            styles[method] = {"kind": kind, "label": f"{method} (LLM)", "color": oranges(shade), "hatch": None}
    return styles


def movable_users(result: dict, candidates: str = "retrieved") -> str:
    """The plot's subtitle: how many users a re-ranker can move."""
    if candidates in EVERY_USER:
        return f"all {result['users']} users can move ({candidates} evaluation: every held-out item is a candidate)"
    return (f"{result['hit_users']} of {result['users']} users can move: only they have the held-out item among the "
            "candidates, every other user is a miss for every method")


def plot_metrics(result: dict, path: Path, title: str = "", candidates: str = "retrieved"):
    """Grouped bars: one panel per metric (HR, NDCG), groups by k, a bar per method, 95% intervals;
    returns the matplotlib Figure (written to `path`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = methods(result)
    styles = bar_styles(names, result.get("baseline", "backbone"))
    ks = result["ks"]
    figure = Figure(figsize=(10, 5), layout="constrained")
    FigureCanvasAgg(figure)  # render off-screen with Agg, whatever the process's pyplot backend
    axes = figure.subplots(1, 2)
    width = 0.8 / max(len(names), 1)
    for axis, metric in zip(axes, ("hr", "ndcg")):
        for i, method in enumerate(names):
            entry = result["methods"][method]
            means, lows, highs = [], [], []
            for k in ks:
                mean = entry["metrics"].get(f"{metric}@{k}")
                low, high = entry["intervals"].get(f"{metric}@{k}") or (None, None)
                mean = 0.0 if mean is None else mean
                means.append(mean)
                lows.append(0.0 if low is None else max(mean - low, 0.0))
                highs.append(0.0 if high is None else max(high - mean, 0.0))
            positions = [j + (i - (len(names) - 1) / 2) * width for j in range(len(ks))]
            style = styles[method]
            axis.bar(positions, means, width, yerr=[lows, highs], capsize=3, label=style["label"],
                     color=style["color"], hatch=style["hatch"], edgecolor="#202020", linewidth=0.5)
        axis.set_xticks(range(len(ks)), [f"@{k}" for k in ks])
        axis.set_title(f"{metric.upper()}@k (95% bootstrap interval)")
        axis.set_ylim(bottom=0)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(names), 4), fontsize="small")
    figure.suptitle((f"{title}\n" if title else "") + movable_users(result, candidates), fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return figure
