"""The finetune stage: tokenise the run's training instructions, pack them, and instruction-
tune the ranker LLM (from scratch, fully fine-tuned, or a local LLaMA checkpoint with LoRA)
on the configured mesh; writes runs/<name>/finetune/.

Outputs: model/ (a Hugging Face folder: config.json, model.safetensors and the tokenizer;
LoRA merged in), adapter/ (the LoRA adapter in PEFT format, when LoRA is on) and
train_log.jsonl (step, loss, tokens/s). Training checkpoints live in
runs/<name>/checkpoints/finetune-<key>/ so an interrupted stage resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from recranker_jax.config import Config
from recranker_jax.errors import RecRankerError
from recranker_jax.llm.hf_export import export_hf
from recranker_jax.llm.hf_import import load_hf_llama
from recranker_jax.llm.llama import Llama, LlamaConfig
from recranker_jax.parallel import axis_size, make_mesh
from recranker_jax.prompts.tokenizer import encode_example, load_tokenizer
from recranker_jax.train.loop import train
from recranker_jax.train.packing import pack
from recranker_jax.train.step import make_optimizer, shard_model


def tokenizer_folder(cfg: Config, instructions_dir: Path) -> Path:
    if cfg.prompts.tokenizer:
        return Path(cfg.prompts.tokenizer)
    return instructions_dir / "tokenizer"


def check_config(cfg: Config) -> None:
    for key in ("seq_len", "batch_size", "steps", "save_every", "accumulation"):
        if getattr(cfg.train, key) < 1:
            raise RecRankerError(f"train.{key}={getattr(cfg.train, key)}: expected a positive integer")
    if cfg.model.checkpoint and not cfg.prompts.tokenizer:
        raise RecRankerError(
            "model.checkpoint is set: set prompts.tokenizer to the same folder so prompts are tokenised "
            "with the checkpoint's own tokenizer"
        )


def build_model(cfg: Config, vocab_size: int) -> Llama:
    if cfg.model.checkpoint:
        model = load_hf_llama(cfg.model.checkpoint)
        if model.config.vocab_size < vocab_size:
            raise RecRankerError(
                f"{cfg.model.checkpoint}: the model has {model.config.vocab_size} token embeddings but the "
                f"tokenizer has {vocab_size} tokens"
            )
        return model
    m = cfg.model
    llama = LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, rope_theta=m.rope_theta,
        max_position_embeddings=cfg.train.seq_len, tie_word_embeddings=m.tie_word_embeddings,
    )
    return Llama(llama, nnx.Rngs(cfg.run.seed))


def build_finetune(cfg: Config, instructions_dir: Path, out: Path, checkpoint_dir: Path, progress: bool = True) -> dict:
    check_config(cfg)
    tokenizer = load_tokenizer(tokenizer_folder(cfg, instructions_dir))
    records = [json.loads(line) for line in (instructions_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    if not records:
        raise RecRankerError(f"{instructions_dir / 'train.jsonl'} has no examples")
    examples = [encode_example(tokenizer, r["prompt"], r["response"]) for r in records]
    rows = pack(examples, cfg.train.seq_len)
    model = build_model(cfg, len(tokenizer))
    lora = cfg.train.lora
    wrt = nnx.Param
    if lora.enabled:
        from recranker_jax.llm.lora import apply_lora

        apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout, nnx.Rngs(cfg.run.seed + 1))
        wrt = nnx.LoRAParam
    mesh = make_mesh(cfg.mesh)
    batch_shards = axis_size(mesh, "batch", cfg.mesh.rules)
    if cfg.train.batch_size % batch_shards:
        raise RecRankerError(
            f"train.batch_size={cfg.train.batch_size} must be a multiple of the {batch_shards} batch shards of the mesh"
        )
    shard_model(model, mesh, cfg.mesh.rules)
    t = cfg.train
    optimizer = nnx.Optimizer(
        model, make_optimizer(t.lr, t.warmup_steps, t.steps, t.weight_decay, t.clip_norm, t.accumulation), wrt=wrt
    )
    log_path = out / "train_log.jsonl"
    with open(log_path, "w") as handle:
        logs, reached = train(
            model, optimizer, rows, batch_size=t.batch_size, steps=t.steps, seed=cfg.run.seed,
            checkpoint_dir=checkpoint_dir, save_every=t.save_every, mesh=mesh, rules=cfg.mesh.rules,
            log=lambda e: handle.write(json.dumps({"step": e.step, "loss": e.loss, "tokens_per_second": e.tokens_per_second}) + "\n"),
            progress=progress,
        )
    if reached < t.steps:
        raise RecRankerError("finetune was interrupted (SIGTERM); run the same command again to resume from its checkpoint")
    if lora.enabled:
        from recranker_jax.llm.lora import export_peft, merge_lora

        export_peft(model, out / "adapter", cfg.model.checkpoint or "recranker-from-scratch",
                    lora.targets, lora.rank, lora.alpha, lora.dropout)
        model = merge_lora(model)
    export_hf(model, out / "model")
    tokenizer.save_pretrained(out / "model")
    summary = {
        "examples": len(examples), "packed_rows": len(rows), "steps": t.steps,
        "answer_tokens": int(rows.loss_mask.sum()),
        "parameters": int(sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "first_loss": logs[0].loss if logs else None, "last_loss": logs[-1].loss if logs else None,
        "median_tokens_per_second": float(np.median([e.tokens_per_second for e in logs[1:]])) if len(logs) > 1 else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

