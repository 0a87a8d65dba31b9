"""Tokenizers for the instruction data and the answer-token loss mask.

A run either uses a Hugging Face tokenizer from a local folder (a LLaMA-2
checkpoint) or a GGUF file (its metadata holds the vocabulary), or trains a
byte-level BPE with `tokenizers` on its own prompts and saves it as a standard
tokenizer.json, loadable by PreTrainedTokenizerFast.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import logging

import numpy as np


class _NoTorchNotice(logging.Filter):
    """Drops transformers' "PyTorch was not found" notice, printed on import when torch is
    absent: this project uses transformers for tokenizers and configs only, never its models.
    Every other message of the library still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


logging.getLogger("transformers").addFilter(_NoTorchNotice())  # before the import below logs it

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast  # noqa: E402

from recranker_jax.errors import RecRankerError  # noqa: E402

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
    """A tokenizer from a local folder (tokenizer.json / tokenizer.model + config) or from a GGUF
    file's metadata (`package:<pkg>/<file>.gguf` for one an installed package ships); never a hub."""
    from recranker_jax.model_files import resolve_model_path

    folder = resolve_model_path(path)
    if folder.suffix == ".gguf":
        return load_gguf_tokenizer(folder)
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


def load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF file's metadata describes, built by transformers' GGUF converter
    (byte-level BPE, sentencepiece, ...) from the metadata as the `gguf` package reads it (so
    without torch, which `AutoTokenizer.from_pretrained(gguf_file=...)` needs). Its BOS and EOS
    are checked against tokenizer.ggml.bos_token_id / eos_token_id; no padding token: EOS."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    from recranker_jax.model_files import metadata, open_gguf

    reader = open_gguf(path)
    architecture = metadata(reader, "general.architecture")
    ids = {kind: metadata(reader, f"tokenizer.ggml.{key}")
           for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                             ("pad", "padding_token_id"))}
    groups = {group: {name: value for key, name in renames.items()
                      if (value := metadata(reader, f"tokenizer.{key}")) is not None}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    del reader
    tokens = groups["tokenizer"].get("tokens")
    if not tokens:
        raise RecRankerError(f"{path}: the GGUF metadata has no tokenizer.ggml.tokens; expected a file with its tokenizer")
    for kind in ("bos", "eos"):
        if ids[kind] is None or not 0 <= ids[kind] < len(tokens):
            raise RecRankerError(f"{path}: tokenizer.ggml.{kind}_token_id is {ids[kind]}; expected the id of a "
                                 f"token among its {len(tokens)} (the prompts need beginning- and end-of-sequence tokens)")
    config = groups["tokenizer_config"]
    if groups["tokenizer"].get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # as transformers: llama.cpp adds BOS to such vocabularies
    special = {f"{kind}_token": tokens[token_id] for kind, token_id in ids.items()
               if token_id is not None and 0 <= token_id < len(tokens)}
    try:
        backend, extra = convert_gguf_tokenizer(architecture, groups["tokenizer"])
    except (ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecRankerError(f"{path}: could not build a tokenizer from the GGUF metadata ({first})") from None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **config, **special, **extra)
    for kind in ("bos", "eos"):
        found = getattr(tokenizer, f"{kind}_token_id")
        if found != ids[kind]:
            raise RecRankerError(f"{path}: the tokenizer's {kind.upper()} token {special[f'{kind}_token']!r} has id "
                                 f"{found}, but tokenizer.ggml.{kind}_token_id is {ids[kind]}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
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
