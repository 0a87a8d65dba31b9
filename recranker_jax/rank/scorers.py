"""The three RecRanker tasks scored by the tuned LLM (the rank stage's scorers): prompts split
into a shared prefix and suffixes, answer tokens, ratings, Yes/No, constrained listwise ranking."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from recranker_jax.errors import RecRankerError
from recranker_jax.llm import decode
from recranker_jax.llm.llama import Llama


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclasses.dataclass
class PromptGroup:
    """One user's prompts of one task: shared prefix ids and one suffix id list per prompt."""

    prefix: list[int]
    suffixes: list[list[int]]


def split_prompts(tokenizer, prompts: Sequence[str], prefix_chars: int) -> PromptGroup:
    """Token ids of prompts sharing their first `prefix_chars` characters, as a shared prefix
    and per-prompt suffixes whose concatenation is exactly each prompt's own tokenisation
    (the prefix is shortened where the tokeniser merges across the boundary)."""
    full = tokenizer(list(prompts))["input_ids"]
    prefix = tokenizer(prompts[0][:prefix_chars])["input_ids"]
    n = min(common_prefix_length(prefix, ids) for ids in full)
    n = min(n, min(len(ids) for ids in full) - 1)  # every suffix keeps at least one token
    return PromptGroup(list(full[0][:n]), [list(ids[n:]) for ids in full])


def token_counts(groups: Sequence[PromptGroup]) -> tuple[int, int]:
    """Prompt tokens run (cached: each prefix once plus every suffix; full: every prompt on its
    own, as generate-and-parse does). Their ratio bounds what prefix caching can save."""
    cached = sum(len(g.prefix) + sum(len(s) for s in g.suffixes) for g in groups)
    full = sum(len(g.prefix) * len(g.suffixes) + sum(len(s) for s in g.suffixes) for g in groups)
    return cached, full


def continuation_ids(tokenizer, context: str, piece: str) -> list[int]:
    """The token ids that `piece` adds after `context` (as the model sees it in training)."""
    before = tokenizer(context, add_special_tokens=False)["input_ids"]
    after = tokenizer(context + piece, add_special_tokens=False)["input_ids"]
    n = common_prefix_length(before, after)
    return list(after[n:]) if n == len(before) else list(tokenizer(piece, add_special_tokens=False)["input_ids"])


@dataclasses.dataclass(frozen=True)
class AnswerTokens:
    """Answers that differ in one token after a shared lead (e.g. '▁' then '1'..'5')."""

    lead: list[int]
    choices: np.ndarray  # [n_answers] the distinguishing token of each answer


def answer_tokens(tokenizer, answers: Sequence[str]) -> AnswerTokens:
    """How the answers (" 1".." H", " Yes"/" No") are tokenised, exactly as in training (the
    response on its own, see prompts.tokenizer.encode_example); refuses a tokenizer under
    which two answers start with the same token after their shared lead."""
    ids = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in answers]
    lead = min(common_prefix_length(ids[0], other) for other in ids)
    heads = [seq[lead] if len(seq) > lead else None for seq in ids]
    if None in heads or len(set(heads)) != len(heads):
        clash = [a for a, h in zip(answers, heads) if h is None or heads.count(h) > 1]
        raise RecRankerError(
            f"the tokenizer cannot tell the answers {', '.join(repr(a) for a in clash)} apart by one token "
            f"(token ids {ids}); use a tokenizer that encodes each answer distinctly or prompts.rating_mode=round"
        )
    return AnswerTokens(list(ids[0][:lead]), np.array(heads, np.int32))


def answer_logprobs(model: Llama, groups: Sequence[PromptGroup], answers: AnswerTokens, users_per_batch: int,
                    desc: str = "score", progress: bool = True) -> np.ndarray:
    """Log-probabilities [prompts, V] of the answer token of every group's prompts (in order),
    after each suffix and the answers' shared lead: a user's prefix is run once and every suffix
    is a branch of its KV cache, so the history is never recomputed."""
    lead = list(answers.lead)
    branches = [[suffix + lead for suffix in g.suffixes] for g in groups]
    return np.stack(decode.next_token_logprobs(model, [g.prefix for g in groups], branches, users_per_batch, desc,
                                               progress))


def expected_ratings(logprobs: np.ndarray, answers: AnswerTokens) -> np.ndarray:
    """Expected rating (1..H) under the distribution renormalised over the H rating tokens."""
    chosen = logprobs[:, answers.choices]
    probabilities = np.exp(chosen - chosen.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return probabilities @ np.arange(1, len(answers.choices) + 1, dtype=np.float64)


def prefers_first(logprobs: np.ndarray, answers: AnswerTokens) -> np.ndarray:
    """1 where P(Yes) > P(No) (answers = Yes, No), else 0."""
    return (logprobs[:, answers.choices[0]] > logprobs[:, answers.choices[1]]).astype(np.int8)


def listwise_rankings(
    model: Llama, contexts: Sequence[Sequence[int]], pieces: Sequence[Sequence[Sequence[Sequence[int]]]],
    top: int, users_per_batch: int, progress: bool = True,
) -> np.ndarray:
    """Constrained greedy rankings: positions [n, k] (1-based place among the first `top`, 0 beyond).
    Each step scores the not-yet-chosen candidates' titles (one branch each of the user's cache)
    and appends the most likely one, so the answer is always a valid ranking.

    contexts: each user's full prompt ids (+ the answer's lead); pieces[u][step == 0 ? 0 : 1][j]:
    candidate j's title ids as the first answer line and as a later line."""
    n, k = len(contexts), max(len(p[0]) for p in pieces)
    steps = min(top, k)
    positions = np.zeros((n, k), np.int32)
    piece_width = decode.round_up(max(len(p) for user in pieces for form in user for p in form), 8)  # cache slots per step
    # the packed titles of a step: one width per call, enough for every user's longest form
    width = decode.bucket_width(max(sum(len(p) for p in form) for user in pieces for form in user))
    for batch in decode.batches_by_length([len(c) for c in contexts], users_per_batch, "listwise", progress):
        cache, key_valid, lengths, prompt_width, last = decode.prefill_batch(
            model, [contexts[u] for u in batch], users_per_batch, steps * piece_width
        )
        chosen = np.zeros((len(batch), k), bool)
        key_valid, next_position = jnp.asarray(key_valid), jnp.asarray(lengths)
        for step in range(steps):
            form = 0 if step == 0 else 1  # the first answer line, or a later one
            packed = decode.pack_branches([[[] if chosen[row, j] else ids for j, ids in enumerate(pieces[u][form])]
                                           for row, u in enumerate(batch)], width, users_per_batch, k)
            cache, key_valid, next_position, last, pick, _ = decode.constrained_step(
                model, cache, key_valid, next_position, last, jnp.asarray(prompt_width + step * piece_width, jnp.int32),
                *(jnp.asarray(packed[key]) for key in ("tokens", "branch_ids", "within", "offsets", "lengths")),
                slots=piece_width,
            )
            pick = np.asarray(pick)
            for row, u in enumerate(batch):
                if packed["lengths"][row, pick[row]]:  # a user with fewer than `steps` candidates picks nothing more
                    chosen[row, pick[row]] = True
                    positions[u, pick[row]] = step + 1
    return positions


# --------------------------------------------------------------------------------------------
# Parsing generated text (the reference's behaviour)
# --------------------------------------------------------------------------------------------


def parse_rating(text: str, max_rating: int) -> float | None:
    """The first integer 1..H in the text, or None (unreadable: the reference then uses 3)."""
    match = re.search(r"\d+", text)
    if match and 1 <= int(match.group()) <= max_rating:
        return float(match.group())
    return None


def parse_yes_no(text: str) -> int:
    """1 for yes, 0 for no, -1 when unreadable."""
    word = re.match(r"\W*(\w+)", text)
    answer = word.group(1).lower() if word else ""
    return 1 if answer == "yes" else 0 if answer == "no" else -1


def parse_ranking(text: str, titles: Sequence[str], top: int) -> np.ndarray | None:
    """1-based positions of the candidates named on the answer's lines (first `top`), None if none."""
    positions = np.zeros(len(titles), np.int32)
    place = 0
    for line in text.splitlines():
        line = line.strip()
        for j, title in enumerate(titles):
            if line and positions[j] == 0 and (line == title or title in line):
                place += 1
                positions[j] = place
                break
        if place == top:
            break
    return positions if place else None
