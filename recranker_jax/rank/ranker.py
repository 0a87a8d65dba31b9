"""The tuned model and tokenizer as the rank stage's ranker: each task's prompts for a group of
users in, per-user answers out (scored from log-probabilities, or generated and parsed)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from recranker_jax.config import Config
from recranker_jax.data.split import SplitData
from recranker_jax.llm import decode
from recranker_jax.llm.hf_import import load_hf_llama
from recranker_jax.llm.llama import Llama, model_options
from recranker_jax.prompts.render import quote
from recranker_jax.prompts.tokenizer import load_tokenizer
from recranker_jax.rank import scorers
from recranker_jax.run import FinetuneFolder, InstructionsFolder, read_json


class Ranker:
    """The tuned model and tokenizer, with the task scorers over groups of users.

    Generate mode answers a task with at most `generate_tokens[task]` tokens, stopping at token
    `eos` (None: never, so exactly that many, e.g. for random weights, which never emit it)."""

    def __init__(self, cfg: Config, tokenizer, model: Llama, max_rating: int, titles: list[str]):
        self.cfg, self.max_rating, self.titles = cfg, max_rating, titles
        self.tokenizer, self.model = tokenizer, model
        self.ratings = scorers.answer_tokens(self.tokenizer, [str(r) for r in range(1, max_rating + 1)])
        self.yes_no = scorers.answer_tokens(self.tokenizer, ["Yes", "No"])
        self.batch = cfg.rank.batch_size
        self.generate_mode = cfg.rank.mode == "generate"
        self.generate_tokens = {"pointwise": 8, "pairwise": 8, "listwise": cfg.rank.generate_tokens}
        self.eos = tokenizer.eos_token_id
        check_batches_fit(cfg, model)

    def _generate(self, task: str, records: list[dict]) -> list[str]:
        ids = [self.tokenizer(r["prompt"])["input_ids"] for r in records]
        outputs = decode.generate(self.model, ids, self.generate_tokens[task], self.eos, self.batch * 4)
        return self.tokenizer.batch_decode(outputs, skip_special_tokens=True)

    def prompt_groups(self, groups: list[list[dict]]) -> list[scorers.PromptGroup]:
        """Each user's prompts of one task as token ids: the shared prefix and each suffix."""
        return [scorers.split_prompts(self.tokenizer, [r["prompt"] for r in g], g[0]["prefix_chars"]) for g in groups]

    def pointwise(self, groups: list[list[dict]]) -> tuple[list[np.ndarray], float]:
        """Per user, the predicted rating of each prompt's candidate; and the unreadable rate."""
        records = [r for g in groups for r in g]
        if self.generate_mode:
            parsed = [scorers.parse_rating(t, self.max_rating) for t in self._generate("pointwise", records)]
            values = np.array([3.0 if p is None else p for p in parsed])  # the reference's fallback
            unreadable = float(np.mean([p is None for p in parsed])) if parsed else 0.0
        else:
            logprobs = scorers.answer_logprobs(self.model, self.prompt_groups(groups), self.ratings, self.batch, "pointwise")
            values, unreadable = scorers.expected_ratings(logprobs, self.ratings), 0.0
        return np.split(values, np.cumsum([len(g) for g in groups])[:-1]), unreadable

    def pairwise(self, groups: list[list[dict]]) -> tuple[list[np.ndarray], float]:
        """Per user, 1 / 0 / -1 (Yes / No / unreadable) for each prompt; and the unreadable rate."""
        records = [r for g in groups for r in g]
        if self.generate_mode:
            answers = np.array([scorers.parse_yes_no(t) for t in self._generate("pairwise", records)], np.int8)
        else:
            logprobs = scorers.answer_logprobs(self.model, self.prompt_groups(groups), self.yes_no, self.batch, "pairwise")
            answers = scorers.prefers_first(logprobs, self.yes_no)
        unreadable = float(np.mean(answers < 0)) if len(answers) else 0.0
        return np.split(answers, np.cumsum([len(g) for g in groups])[:-1]), unreadable

    def score(self, task: str, groups: list[list[dict]]) -> tuple[list[np.ndarray], float]:
        """One task's per-user answers for these users' prompt groups, and its unreadable rate."""
        if task == "pointwise":
            return self.pointwise(groups)
        if task == "pairwise":
            return self.pairwise(groups)
        return self.listwise([g[0] for g in groups])

    def listwise(self, records: list[dict]) -> tuple[list[np.ndarray], float]:
        """Per user, the 1-based place of each shown candidate (0 = not in the answer)."""
        top = self.cfg.rank.list_positions
        if self.generate_mode:
            shown = [[self.titles[i] for i in r["_items"]] for r in records]
            parsed = [scorers.parse_ranking(t, s, top) for t, s in zip(self._generate("listwise", records), shown)]
            unreadable = float(np.mean([p is None for p in parsed])) if parsed else 0.0
            return [np.zeros(len(s), np.int32) if p is None else p for p, s in zip(parsed, shown)], unreadable
        tok = self.tokenizer
        contexts = [tok(r["prompt"])["input_ids"] for r in records]
        pieces = [[[tok(" " + self.titles[i], add_special_tokens=False)["input_ids"] for i in r["_items"]],
                   [scorers.continuation_ids(tok, " " + self.titles[r["_items"][0]], "\n" + self.titles[i]) for i in r["_items"]]]
                  for r in records]
        positions = scorers.listwise_rankings(self.model, contexts, pieces, top, self.batch)
        return [positions[u, : len(r["_items"])] for u, r in enumerate(records)], 0.0


def check_batches_fit(cfg: Config, model: Llama) -> None:
    """Before scoring: a batch of rank.batch_size prompts of prompts.max_tokens tokens (4 times
    the rows when generating) fits the host as arrays (token ids, mask, positions: 9 bytes a
    token) and one device as the model's key-value cache (the model ranks on one device)."""
    from recranker_jax.config_checks import check_fits
    from recranker_jax.hardware import host_memory_available, memory_capacity

    c, r = model.config, cfg.rank
    rows_per_batch = 4 if r.mode == "generate" else 1
    width = cfg.prompts.max_tokens + (r.generate_tokens if r.mode == "generate" else 0)
    what = f"one rank batch of prompts of up to {width:,} tokens"
    check_fits("rank.batch_size", r.batch_size, rows_per_batch * width * 9, 0, host_memory_available(), what,
               "this host's free memory")
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_size * jnp.dtype(model.dtype).itemsize
    capacity, where = memory_capacity()
    check_fits("rank.batch_size", r.batch_size, rows_per_batch * width * kv_per_token, 0, capacity,
               f"{what} as the model's key-value cache", where)


def load_ranker(cfg: Config, data: SplitData, instructions_dir: Path, finetune_dir: Path | None,
                model: Llama | None = None, tokenizer=None) -> Ranker:
    """The run's tuned model (finetune_dir/model) with its rating scale and quoted titles; or,
    given them, an in-memory `model` and its `tokenizer` (e.g. random weights, for a benchmark)."""
    stats = read_json(InstructionsFolder(instructions_dir).stats, "run `recranker instructions` first")
    titles = [quote(str(t)) for t in data.items["title"]]
    if model is None:
        model_dir = FinetuneFolder(finetune_dir).model
        tokenizer = load_tokenizer(model_dir)
        model = load_hf_llama(model_dir, **model_options(cfg, training=False))
    return Ranker(cfg, tokenizer, model, int(stats["max_rating"]), titles)
