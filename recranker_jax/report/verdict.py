"""The report's verdict: one plain paragraph per split saying whether the LLM re-ranker beat
the backbone's own order, with the numbers of the tables below it (same formatting), the best
non-LLM control, and how many users could move at all.

A method beats the backbone order when its NDCG@k (the first of rank.ks) is higher and the
paired sign-flip test gives p < ALPHA; a higher mean with a larger p is "within chance"."""

from __future__ import annotations

from recranker_jax.report.tables import (
    EVERY_USER,
    LLM_METHODS,
    label,
    methods,
    number,
    p_value,
    signed,
)

ALPHA = 0.05
BACKBONE_NAMES = {"lightgcn": "LightGCN", "mf": "BPR-MF", "sasrec": "SASRec", "explicit_mf": "explicit MF",
                  "popularity": "popularity"}


def backbone_order(backbone: str | None) -> str:
    """`the LightGCN order` for the run's retrieval backbone, `the backbone order` when unknown."""
    if not backbone or backbone == "–":
        return "the backbone order"
    return f"the {BACKBONE_NAMES.get(backbone, backbone)} order"


def _comparison(result: dict, method: str, metric: str) -> dict | None:
    entry = result["methods"][method]
    test = (entry.get("paired") or {}).get(metric)
    if not test or test.get("difference") is None or entry["metrics"].get(metric) is None:
        return None
    return {"method": method, "value": entry["metrics"][metric], "difference": test["difference"],
            "p": test.get("p_value")}


def _quote(c: dict, metric: str, baseline_value: float | None, versus: bool = True) -> str:
    against = f" vs {number(baseline_value)}" if versus else ""
    return f"{c['method']} {label(metric)} {number(c['value'])}{against} (Δ {signed(c['difference'])}, paired p {p_value(c['p'])})"


def _significant(c: dict) -> bool:
    return c["p"] is not None and c["p"] < ALPHA


def split_verdict(result: dict, candidates: str = "retrieved", backbone: str | None = None,
                  sample_users: int | None = None, tuned_on_this_split: bool = False) -> str:
    """The verdict on one split's results (a `splits` entry of ranking/metrics.json)."""
    metric = f"ndcg@{result['ks'][0]}"
    order = backbone_order(backbone)
    baseline_value = result["methods"][result["baseline"]]["metrics"].get(metric)
    present = methods(result)
    llm = [c for m in present if m in LLM_METHODS and (c := _comparison(result, m, metric))]
    featured = None
    controls = [c for m in present if m not in LLM_METHODS and m != result["baseline"]
                and (c := _comparison(result, m, metric))]
    sentences = []
    if not llm:
        sentences.append(f"No LLM method was evaluated; {order} scores {label(metric)} {number(baseline_value)}.")
    else:
        winners = [c for c in llm if c["difference"] > 0 and _significant(c)]
        if winners:
            sentences.append(f"The LLM beat {order}: " + "; ".join(_quote(c, metric, baseline_value) for c in winners) + ".")
        else:
            featured = next((c for c in llm if c["method"] == "hybrid"), max(llm, key=lambda c: c["difference"]))
            below = featured["difference"] < 0 and _significant(featured)
            sentences.append(f"No LLM method beat {order}: {_quote(featured, metric, baseline_value)}"
                             + (", significantly below it." if below else "."))
            best = max(llm, key=lambda c: c["difference"])
            if best is not featured and best["difference"] > 0:
                sentences.append(f"The highest, {_quote(best, metric, baseline_value, versus=False)}, is within chance.")
        worse = [c for c in llm if c["difference"] < 0 and _significant(c) and c is not featured]
        if worse:
            sentences.append("Significantly below it: " + "; ".join(_quote(c, metric, None, versus=False) for c in worse) + ".")
    if controls:
        best_control = max(controls, key=lambda c: c["difference"])
        sentences.append(f"Best non-LLM control: {_quote(best_control, metric, None, versus=False)}.")
    sentences.append(_who_can_move(result, candidates, sample_users))
    if tuned_on_this_split:
        sentences.append("The hybrid's weights were chosen on this item, so its numbers here are optimistic.")
    return " ".join(sentences)


def _who_can_move(result: dict, candidates: str, sample_users: int | None) -> str:
    users = result["users"]
    sample = f" (a seeded sample, rank.sample_users={sample_users})" if sample_users else ""
    if candidates in EVERY_USER:
        text = f"All {users} users{sample} count: the {candidates} evaluation puts every held-out item among the candidates."
        if candidates == "planted" and result.get("held_out_last") is not None:
            text += (f" The backbone order puts it last for {result['held_out_last']} of them, so disagreeing with "
                     "that order gains by itself: compare with the random control.")
        return text
    hit = result["hit_users"]
    if hit == users:
        return f"All {users} users{sample} had the held-out item among the candidates."
    return (f"Only {hit} of {users} users{sample} had the held-out item among the candidates; the others are misses "
            "for every method.")


def run_verdicts(metrics_json: dict, backbone: str | None = None) -> list[tuple[str, str]]:
    """(split, verdict) for every split of a run's ranking/metrics.json, test first."""
    from recranker_jax.report.tables import candidate_set, ordered_splits

    splits = metrics_json.get("splits", {})
    return [(split, split_verdict(splits[split], candidate_set(metrics_json), backbone,
                                  metrics_json.get("sample_users"), tuned_on(metrics_json, split)))
            for split in ordered_splits(splits)]


def tuned_on(metrics_json: dict, split: str) -> bool:
    """Whether the hybrid's weights were chosen on this split (rank.tune_alphas)."""
    tuned = metrics_json.get("tuned_alphas")
    return bool(tuned) and tuned.get("on", "valid") == split


RULE = (f"A method beats the backbone order when its NDCG@k (the first k) is higher with a paired sign-flip test p < "
        f"{ALPHA}; Δ is the method's mean per-user NDCG@k minus the backbone order's.")
