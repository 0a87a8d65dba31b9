"""The pretrain stage: domain pre-training of the ranker LLM with a causal-LM loss on every
user's training history (`prompts/pretraining.py`), before instruction tuning; writes
runs/<name>/pretrain/ (model/: a Hugging Face folder with the tokenizer, train_log.jsonl,
summary.json). With `pretrain.enabled` false it writes only summary.json, and the finetune
starts from model.checkpoint or a fresh model. Checkpoints, mesh and LoRA as the finetune's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recranker_jax.config import Config
from recranker_jax.data.split import load_split
from recranker_jax.errors import RecRankerError
from recranker_jax.parallel import is_primary
from recranker_jax.prompts.pretraining import pretraining_documents
from recranker_jax.prompts.tokenizer import load_tokenizer
from recranker_jax.run import PretrainFolder, write_json
from recranker_jax.train.stage import Schedule, tokenizer_folder, tune


def encode_documents(tokenizer, texts: list[str], seq_len: int, window_items: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """BOS + text + EOS of each document, the loss on every token after the first; a document
    longer than `seq_len` is a one-line error naming the keys to change."""
    examples = []
    for ids in tokenizer(texts)["input_ids"]:
        ids = np.array([*ids, tokenizer.eos_token_id], np.int32)
        if len(ids) > seq_len:
            raise RecRankerError(
                f"pretrain.window_items={window_items}: a pre-training window is {len(ids)} tokens, more than "
                f"train.seq_len={seq_len}; lower pretrain.window_items or raise train.seq_len")
        examples.append((ids, np.ones(len(ids), np.int32)))
    return examples


def build_pretrain(cfg: Config, data_dir: Path, instructions_dir: Path, out: Path, checkpoint_dir: Path,
                   progress: bool = True) -> dict:
    folder, p = PretrainFolder(out), cfg.pretrain
    if not p.enabled:
        summary = {"enabled": False}
    else:
        data = load_split(data_dir)
        noun = cfg.prompts.item_noun or data.meta.get("item_noun", "item")
        documents = pretraining_documents(data, cfg.prompts, noun, p.window_items, p.stride_items)
        if not documents:
            raise RecRankerError(f"{data_dir}: no user has two training interactions to pre-train on")
        tokenizer = load_tokenizer(tokenizer_folder(cfg, instructions_dir))
        examples = encode_documents(tokenizer, [text for _, _, text in documents], cfg.train.seq_len, p.window_items)
        summary = tune(cfg, Schedule(p.steps, p.batch_size, p.lr, p.warmup_steps, "pretrain"), examples, tokenizer,
                       None, folder.model, folder.train_log, checkpoint_dir, progress)
        summary.update(enabled=True, documents=len(documents), users=len({u for u, _, _ in documents}),
                       tokens=int(sum(len(ids) for ids, _ in examples)))
    if is_primary():
        write_json(folder.summary, summary)
    return summary
