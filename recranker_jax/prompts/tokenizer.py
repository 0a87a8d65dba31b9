"""Tokenizers for the instruction data and the answer-token loss mask.

A run either uses a Hugging Face tokenizer from a local folder (a LLaMA-2
checkpoint) or trains a byte-level BPE with `tokenizers` on its own prompts and
saves it as a standard tokenizer.json, loadable by PreTrainedTokenizerFast.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from recranker_jax.errors import RecRankerError

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_bpe(corpus: Iterable[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus`, save tokenizer.json (+ HF files) in out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    bos = tokenizer.token_to_id(SPECIAL_TOKENS["bos_token"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder (tokenizer.json / tokenizer.model + config); never a hub."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise RecRankerError(f"tokenizer folder {folder} not found: expected a local checkpoint or tokenizer folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecRankerError(f"tokenizer folder {folder}: could not load a tokenizer ({first})") from None
    if tokenizer.eos_token_id is None:
        raise RecRankerError(f"tokenizer folder {folder}: the tokenizer has no end-of-sequence token")
    return tokenizer


def count_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool = True) -> np.ndarray:
    """Number of tokens of each text (with the tokenizer's special tokens, unless told not to)."""
    if not texts:
        return np.zeros(0, int)
    return np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]])


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of prompt + " " + response + EOS and the loss mask: 1 on the response and
    EOS tokens (the answer), 0 on the prompt. The response is tokenised on its own so the
    boundary between prompt and answer is a token boundary."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = np.array(prompt_ids + response_ids, dtype=np.int32)
    mask = np.concatenate([np.zeros(len(prompt_ids), np.int32), np.ones(len(response_ids), np.int32)])
    return ids, mask
