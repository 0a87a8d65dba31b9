"""Every config key with its one-line meaning, in one place (`recranker config keys`), and the
resolved config as YAML with each key's meaning beside it (`recranker config show`). A test
holds KEYS to exactly the keys of `config.Config`, so a new key needs its line here."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

import yaml

from recranker_jax.config import Config, _type_name

KEYS: dict[str, str] = {
    "run": "where a run lives and its seed",
    "run.name": "the run's folder name under run.root (no /, not ..)",
    "run.root": "the folder holding the runs; absolute and shared by every host when several run",
    "run.seed": "seeds every random choice (0 to 2**32 - 1): the same config gives the same run",
    "run.rebuild": "replace finished stages built with other settings (--rebuild); one command's setting, never recorded",
    "run.compilation_cache": "JAX's persistent compilation cache in run.root/.jax_cache: auto (on accelerators), always, never",
    "run.tensorboard": "TensorBoard event files of every training stage in runs/<name>/<stage>/tensorboard/ (true, false)",
    "data": "which ratings to load and how they become the leave-one-out split",
    "data.source": "movielens-small (embedded), ml-100k, ml-1m, bookcrossing, or tfds:<name>",
    "data.path": "folder or zip with the source's files (not needed for movielens-small)",
    "data.like_threshold": "a rating >= this is a like; null: the source's default (4 on 1-5, 8 on 1-10)",
    "data.dislike_threshold": "a rating <= this is a dislike; null: the source's default (2 on 1-5, 4 on 1-10)",
    "data.min_likes": "users with fewer likes are dropped (test + validation + at least one training like)",
    "data.on_bad_lines": "error (stop at the first malformed line) or skip (count them in the statistics)",
    "mesh": "the device mesh and how logical axes map onto it",
    "mesh.shape": "devices along each mesh axis; one entry may be -1 (the remaining devices)",
    "mesh.axes": "the mesh axes' names (data, fsdp, tensor)",
    "mesh.rules": "logical axis name -> mesh axes it is sharded over ([] or absent: replicated)",
    "retrieval": "the conventional recommenders (backbones) and their candidates",
    "retrieval.models": "models to train: lightgcn, mf, explicit_mf, popularity, sasrec or a registered backbone",
    "retrieval.backbone": "the model whose top-k items the LLM re-ranks",
    "retrieval.candidates": "k: candidates per user that the LLM re-ranks",
    "retrieval.dim": "embedding size of LightGCN and BPR-MF",
    "retrieval.layers": "LightGCN propagation layers (0 is BPR-MF)",
    "retrieval.lr": "Adam learning rate of LightGCN and BPR-MF",
    "retrieval.l2": "L2 weight on the batch's layer-0 embeddings",
    "retrieval.batch_size": "training likes per BPR step",
    "retrieval.epochs": "most training epochs",
    "retrieval.eval_every": "validate NDCG@10 every this many epochs",
    "retrieval.patience": "stop after this many validations without improvement (the best epoch is kept)",
    "retrieval.propagation": "dense, edges (gather + segment_sum) or auto (dense while the graph is small)",
    "retrieval.eval_batch_users": "users per batch when ranking the whole catalogue",
    "retrieval.explicit_mf": "the rating MF behind the pointwise hint (training ratings only)",
    "retrieval.explicit_mf.dim": "its factor size",
    "retrieval.explicit_mf.lr": "its Adam learning rate",
    "retrieval.explicit_mf.l2": "its L2 weight",
    "retrieval.explicit_mf.batch_size": "ratings per step",
    "retrieval.explicit_mf.epochs": "most epochs",
    "retrieval.explicit_mf.eval_every": "validate every this many epochs",
    "retrieval.explicit_mf.patience": "stop after this many validations without improvement",
    "retrieval.sequence": "SASRec's settings (retrieval.models entry sasrec)",
    "retrieval.sequence.max_len": "the user's last this many training likes, in time order",
    "retrieval.sequence.dim": "embedding size",
    "retrieval.sequence.blocks": "causal self-attention blocks",
    "retrieval.sequence.heads": "attention heads per block",
    "retrieval.sequence.dropout": "dropout rate in training",
    "retrieval.sequence.lr": "Adam learning rate",
    "retrieval.sequence.batch_size": "users per step",
    "retrieval.sequence.epochs": "most epochs",
    "retrieval.sequence.eval_every": "validate NDCG@10 every this many epochs",
    "retrieval.sequence.patience": "stop after this many validations without improvement",
    "retrieval.sequence.loss": "ce (full-softmax cross-entropy) or bce (one sampled negative, the paper's)",
    "retrieval.sequence.l2": "L2 weight on the parameters",
    "sampling": "which users the training instructions are drawn for (adaptive user sampling)",
    "sampling.strategy": "uniform, importance, cluster or adaptive (importance + cluster, repetition penalty)",
    "sampling.size": "entries drawn (with replacement); each gives one example per task",
    "sampling.fraction": "share of size that importance and cluster each draw before the penalty",
    "sampling.clusters": "k-means clusters of the backbone's user embeddings",
    "sampling.penalty": "an entry whose user is in the pool c times weighs penalty^(c-1)",
    "prompts": "the three prompt tasks, their ablation switches and the tokenizer",
    "prompts.tasks": "the tasks to build: pointwise, pairwise, listwise",
    "prompts.item_noun": "what the items are called in prompts; null: the source's (movie, book)",
    "prompts.rating_mode": "half stars rounded half up to 1..H (round) or doubled onto 1..2H (double)",
    "prompts.position_shift": "swap pairs and shuffle listwise candidates at random (the paper's position shifting)",
    "prompts.hints": "add the backbone's and explicit MF's hints to prompts (the paper's prompt enhancement)",
    "prompts.history_items": "most rated (or liked) items shown as the user's history",
    "prompts.disliked_items": "most disliked items shown in pairwise and listwise prompts",
    "prompts.listwise_liked": "liked items among a listwise training example's candidates",
    "prompts.listwise_candidates": "candidates of a listwise training example",
    "prompts.pairs": "disjoint candidate pairs per user at inference (each asked in both orders)",
    "prompts.inference_listwise_order": "listwise candidates at inference: shuffle or retrieval order",
    "prompts.max_tokens": "prompt budget in tokens; the oldest history items are dropped first",
    "prompts.tokenizer": "a local HF tokenizer folder, a .gguf file, package:<pkg>/<file>, or null: train a BPE",
    "prompts.tokenizer_vocab_size": "vocabulary of the BPE trained when prompts.tokenizer is null",
    "prompts.templates": "the prompt templates (str.format; each must keep its placeholders)",
    "prompts.templates.pointwise_instruction": "pointwise prompt: instruction and {history}",
    "prompts.templates.pointwise_question": "pointwise prompt: the {target} question",
    "prompts.templates.pointwise_hint": "pointwise hint: the explicit MF's {rating}",
    "prompts.templates.pairwise_instruction": "pairwise prompt: instruction, liked {history} and {disliked}",
    "prompts.templates.pairwise_question": "pairwise prompt: {first} over {second}?",
    "prompts.templates.pairwise_hint": "pairwise hint: the backbone's {preferred} item",
    "prompts.templates.listwise_instruction": "listwise prompt: instruction, liked {history} and {disliked}",
    "prompts.templates.listwise_question": "listwise prompt: the {candidates} to rank",
    "prompts.templates.listwise_hint": "listwise hint: the backbone's {ranked} top items",
    "model": "the ranker LLM: a local checkpoint, or a small LLaMA trained from scratch",
    "model.checkpoint": "a local HF LLaMA folder, a .gguf file, package:<pkg>/<file>, or null (from scratch)",
    "model.hidden_size": "hidden size of a model trained from scratch",
    "model.intermediate_size": "MLP size of a model trained from scratch",
    "model.num_hidden_layers": "layers of a model trained from scratch",
    "model.num_attention_heads": "attention heads of a model trained from scratch",
    "model.num_key_value_heads": "key/value heads (grouped-query attention) of a model trained from scratch",
    "model.rope_theta": "rotary embedding base of a model trained from scratch",
    "model.tie_word_embeddings": "share the input embedding and the output head (from scratch)",
    "model.dtype": "compute dtype: float32 or bfloat16 (norms and softmax stay float32)",
    "model.param_dtype": "stored weights' dtype; LoRA adapters and optimizer moments stay float32",
    "model.scan_layers": "run the layers as one stacked block under nnx.scan (false: a Python loop)",
    "model.attention": "attention kernel: auto, tiled, xla, pallas_gpu, cudnn or splash",
    "pretrain": "domain pre-training on the users' training histories, before instruction tuning",
    "pretrain.enabled": "run it (false: the finetune starts from model.checkpoint or a fresh model)",
    "pretrain.window_items": "most history items per training window",
    "pretrain.stride_items": "a window starts every this many items",
    "pretrain.steps": "optimizer steps",
    "pretrain.batch_size": "packed rows per step",
    "pretrain.lr": "peak learning rate",
    "pretrain.warmup_steps": "linear warmup steps",
    "train": "instruction tuning of the ranker LLM",
    "train.enabled": "tune (false: rank the starting model untuned, the zero-shot baseline)",
    "train.seq_len": "tokens per packed row",
    "train.batch_size": "packed rows per step, split over the mesh's batch axes",
    "train.steps": "optimizer steps",
    "train.lr": "peak learning rate (warmup, then cosine decay)",
    "train.warmup_steps": "linear warmup steps",
    "train.weight_decay": "AdamW weight decay",
    "train.clip_norm": "gradient clipping by global norm",
    "train.accumulation": "micro-batches accumulated per step",
    "train.save_every": "write a checkpoint every this many steps (and on SIGTERM)",
    "train.keep_checkpoint": "keep the last training checkpoint once the stage finished",
    "train.profile_steps": "[start, stop]: jax.profiler trace of those steps into runs/<name>/<stage>/profile/; [] is off",
    "train.remat": "rematerialisation policy: auto (none on CPU, dots elsewhere), none, minimal, dots, full",
    "train.lora": "LoRA adapters (off: full fine-tuning)",
    "train.lora.enabled": "train LoRA adapters only",
    "train.lora.targets": "projections that get adapters: q, k, v, o, gate, up, down",
    "train.lora.rank": "adapter rank",
    "train.lora.alpha": "adapter scale numerator (scale = alpha / rank)",
    "train.lora.dropout": "dropout on the adapters' input",
    "rank": "re-ranking the candidates with the tuned LLM, the hybrid and the evaluation",
    "rank.methods": "what to score and evaluate: pointwise, pairwise, listwise, hybrid",
    "rank.mode": "scores (probabilities, constrained decoding) or generate (free text, parsed: the reference)",
    "rank.retrieval_weight": "U_retrieval = weight * (k - rank): the backbone order's share of the hybrid",
    "rank.pair_credit": "C2: utility of a consistent pairwise preference (half each when inconsistent)",
    "rank.list_credit": "C3: the listwise answer's item at position p gets C3 * (list_positions + 1 - p)",
    "rank.list_positions": "length of the listwise answer",
    "rank.alphas": "hybrid weights of the pointwise, pairwise and listwise utilities",
    "rank.tune_alphas": "choose the hybrid weights on the validation item instead",
    "rank.users": "hits (score only users whose held-out item is a candidate) or all",
    "rank.candidates": "retrieved (the protocol), planted or sampled: what the re-ranker is given",
    "rank.baselines": "non-LLM re-rankers shown beside the LLM: transition, random, or a retrieval model",
    "rank.sample_users": "evaluate a seeded sample of this many users (null: all)",
    "rank.splits": "held-out items to evaluate: test, valid",
    "rank.ks": "cut-offs of HR@k and NDCG@k; the first decides the verdict and tune_alphas",
    "rank.batch_size": "users per scorer batch",
    "rank.generate_tokens": "most new tokens per answer in generate mode",
    "rank.bootstrap": "bootstrap resamples of the 95% intervals",
}


def config_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """(dotted key, type, field) of every field, sections before their keys, in declaration order."""
    hints = typing.get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        key = prefix + field.name
        found.append((key, hints[field.name], field))
        if dataclasses.is_dataclass(hints[field.name]):
            found += config_fields(hints[field.name], key + ".")
    return found


def leaf_keys() -> list[str]:
    """Every key a `key=value` override can set to a value (not a section)."""
    return [key for key, tp, _ in config_fields() if not dataclasses.is_dataclass(tp)]


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def _inline(value: Any) -> str:
    """One line of YAML for a value (JSON for text with line breaks: JSON strings are YAML)."""
    if isinstance(value, str) and ("\n" in value or value != value.strip()):
        return json.dumps(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[:-3].strip() if text.endswith("...") else text


def format_keys() -> str:
    """`recranker config keys`: each key, its type and default, and its meaning."""
    lines = []
    for key, tp, field in config_fields():
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}: {KEYS[key]}")
            continue
        default = _inline(_default(field))
        if len(default) > 40:
            default = default[:37] + "..."
        lines.append(f"  {key} ({_type_name(tp)}; default {default}): {KEYS[key]}")
    return "\n".join(lines)


def format_config(cfg: Config) -> str:
    """`recranker config show`: the resolved config as YAML, each key's meaning as a comment.
    It loads back (as a file or through yaml) to the same config."""
    values = cfg.to_dict()
    lines = []
    for key, tp, _ in config_fields():
        parts = key.split(".")
        indent = "  " * (len(parts) - 1)
        if dataclasses.is_dataclass(tp):
            lines.append(f"{indent}{parts[-1]}:  # {KEYS[key]}")
            continue
        value: Any = values
        for part in parts:
            value = value[part]
        lines.append(f"{indent}{parts[-1]}: {_inline(value)}  # {KEYS[key]}")
    return "\n".join(lines) + "\n"
