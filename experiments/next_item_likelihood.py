"""One-off measurement for issue 16 (not part of the package): score each user's candidates by
the log-likelihood of the item's line right after the user's training history, written as
domain pre-training writes it (prompts/pretraining.py), under a causal LM of a finished run,
e.g. the pre-trained model of `recranker rank run.name=pt-probe pretrain.enabled=true`.

    python experiments/next_item_likelihood.py runs/pt-probe/pretrain/model --run runs/pt-probe \
        --candidates sampled [--history 20]

Prints NDCG@3 with the paired p against the backbone order, per split, for:
  likelihood   sum of the line's token log-probabilities (the next item as pre-training teaches it)
  per_token    the same divided by the line's token count (length-normalised)
  pmi          likelihood minus the line's log-probability after the header alone (no history):
               what the history adds over the item's prior (popularity, title length)
  +w*rank      the score plus w * (k - r) for 0-based backbone rank r
  transition   the non-LLM transition re-ranker, for reference
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recranker_jax.data.split import load_split
from recranker_jax.llm.hf_import import load_hf_llama
from recranker_jax.prompts.pretraining import history_lines
from recranker_jax.prompts.render import quote
from recranker_jax.prompts.tokenizer import load_tokenizer
from recranker_jax.rank import answers, baselines, hybrid
from recranker_jax.rank.evaluate import evaluate_orders
from recranker_jax.rank.scorers import continuation_ids
from recranker_jax.run import RetrievalFolder, read_candidates


@nnx.jit
def token_logprobs(model, tokens):
    logits = model(tokens).astype(jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], axis=-1), tokens[:, 1:, None], axis=-1)[..., 0]


def line_scores(model, tokenizer, contexts: list[str], lines: list[list[str]], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probabilities [users, k] of each line after its user's context, and their token counts."""
    sequences, spans = [], []
    for context, user_lines in zip(contexts, lines):
        ids = tokenizer(context)["input_ids"]
        for line in user_lines:
            piece = continuation_ids(tokenizer, context, line)
            sequences.append(ids + piece)
            spans.append((len(ids), len(piece)))
    width = -(-max(len(s) for s in sequences) // 64) * 64
    total, count = np.zeros(len(sequences)), np.zeros(len(sequences))
    for start in range(0, len(sequences), batch):
        rows = np.zeros((batch, width), np.int32)
        for j, s in enumerate(sequences[start:start + batch]):
            rows[j, :len(s)] = s
        logprobs = np.asarray(token_logprobs(model, jnp.asarray(rows)))
        for j in range(min(batch, len(sequences) - start)):
            first, n = spans[start + j]
            total[start + j], count[start + j] = logprobs[j, first - 1: first - 1 + n].sum(), n
    k = len(lines[0])
    return total.reshape(-1, k), count.reshape(-1, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a run's model folder (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--run", type=Path, required=True, help="the run folder with data/ and retrieval/")
    parser.add_argument("--candidates", choices=["retrieved", "planted", "sampled"], default="retrieved")
    parser.add_argument("--history", type=int, default=20, help="the user's last N training interactions as context")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    data = load_split(args.run / "data")
    tokenizer, model = load_tokenizer(args.model), load_hf_llama(args.model)
    titles = [quote(str(t)) for t in data.items["title"]]
    header = f"The user's rated {data.meta.get('item_noun', 'item')}s:\n"
    histories = history_lines(data, "round")
    retrieval = RetrievalFolder(args.run / "retrieval")
    for split in ("test", "valid"):
        cand = answers.candidate_matrix(read_candidates(retrieval.candidate_set(args.candidates, split), data), data.n_users)
        target = np.asarray(data.test_item if split == "test" else data.valid_item)
        users = answers.scored_users(cand, target, only_hits=True)
        lines = [["\n" + titles[i] + ":" for i in cand[u]] for u in users]
        contexts = [header + "\n".join(line for _, line in histories[u][-args.history:]) for u in users]
        score, count = line_scores(model, tokenizer, contexts, lines, args.batch)
        prior, _ = line_scores(model, tokenizer, [header.rstrip("\n")] * len(users), lines, args.batch)

        def full(values: np.ndarray) -> np.ndarray:
            out = np.full(cand.shape, -np.inf)
            out[users] = values
            return out

        k = cand.shape[1]
        rank_term = (k - np.arange(k))[None, :].astype(float)
        utilities = {"likelihood": full(score), "per_token": full(score / count), "pmi": full(score - prior)}
        for w in (0.1, 0.3, 1.0):
            utilities[f"likelihood+{w}*rank"] = full(score + w * rank_term)
            utilities[f"pmi+{w}*rank"] = full(score - prior + w * rank_term)
        utilities["transition"] = baselines.transition_baseline(
            data.train_user, data.train_item, data.train_is_like, data.n_users, data.n_items, cand)
        orders = {"backbone": cand, **{m: np.asarray(o) for m, o in hybrid.rank_orders(cand, utilities).items()}}
        result = evaluate_orders(orders, target, [3], 100, 0)
        print(f"{split}: {args.candidates} candidates, {len(users)} users scored")
        for method, entry in result["methods"].items():
            p = entry.get("paired", {}).get("ndcg@3", {}).get("p_value")
            print(f"  {method:22s} NDCG@3 {entry['metrics']['ndcg@3']:.4f}" + (f"  p {p:.4f}" if p is not None else ""))


if __name__ == "__main__":
    main()
