"""The finetune stage: tokenise the run's training instructions, pack them, and instruction-
tune the ranker LLM (from scratch, fully fine-tuned, or a local LLaMA checkpoint with LoRA)
on the configured mesh; writes runs/<name>/finetune/.

Outputs: model/ (a Hugging Face folder: config.json, model.safetensors and the tokenizer;
LoRA merged in), adapter/ (the LoRA adapter in PEFT format, when LoRA is on) and
train_log.jsonl (step, loss, tokens/s). Training checkpoints live in
runs/<name>/checkpoints/finetune-<key>/ so an interrupted stage resumes.

With several processes (recranker_jax.parallel), every process runs `build_finetune` (the
mesh spans all of them); only the primary process writes the log, model, adapter and summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from recranker_jax.config import Config
from recranker_jax.errors import RecRankerError
from recranker_jax.llm.hf_export import export_hf
from recranker_jax.llm.hf_import import load_hf_llama
from recranker_jax.llm.llama import Llama, LlamaConfig, model_options
from recranker_jax.config_checks import check_batch
from recranker_jax.parallel import is_primary, make_mesh
from recranker_jax.prompts.tokenizer import encode_example, load_tokenizer
from recranker_jax.train.loop import train
from recranker_jax.train.packing import pack
from recranker_jax.run import FinetuneFolder, InstructionsFolder, read_jsonl, write_json
from recranker_jax.train.step import learning_rate_schedule, make_optimizer, shard_model, shard_optimizer


def tokenizer_folder(cfg: Config, instructions_dir: Path) -> Path:
    """prompts.tokenizer, or the one the instructions stage trained."""
    if cfg.prompts.tokenizer:
        return Path(cfg.prompts.tokenizer)
    return InstructionsFolder(instructions_dir).tokenizer


def build_model(cfg: Config, vocab_size: int, mesh=None) -> Llama:
    """The ranker LLM: the checkpoint's weights placed on the mesh, or a fresh model."""
    m = cfg.model
    if m.checkpoint:
        model = load_hf_llama(m.checkpoint, mesh, cfg.mesh.rules, **model_options(cfg))
        if model.config.vocab_size < vocab_size:
            raise RecRankerError(
                f"{m.checkpoint}: the model has {model.config.vocab_size} token embeddings but the "
                f"tokenizer has {vocab_size} tokens"
            )
        return model
    llama = LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, rope_theta=m.rope_theta,
        max_position_embeddings=cfg.train.seq_len, tie_word_embeddings=m.tie_word_embeddings,
    )
    return Llama(llama, nnx.Rngs(cfg.run.seed), **model_options(cfg))


def throughput_model(cfg: Config, model: Llama, mesh) -> dict:
    """Training FLOPs per token and the mesh's peak FLOP/s (None off the known accelerators), for MFU."""
    from recranker_jax.hardware import llama_flops_per_token, peak_flops

    lora_parameters = int(sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))
    trainable = "lora" if cfg.train.lora.enabled else "full"
    peak = peak_flops(mesh.devices.flat[0], cfg.model.dtype)
    return {"flops_per_token": llama_flops_per_token(model.config, cfg.train.seq_len, trainable, lora_parameters),
            "peak_flops": peak * mesh.devices.size if peak else None}


def build_finetune(cfg: Config, instructions_dir: Path, out: Path, checkpoint_dir: Path, progress: bool = True) -> dict:
    tokenizer = load_tokenizer(tokenizer_folder(cfg, instructions_dir))
    train_file, folder = InstructionsFolder(instructions_dir).train, FinetuneFolder(out)
    records = read_jsonl(train_file)
    if not records:
        raise RecRankerError(f"{train_file} has no examples")
    examples = [encode_example(tokenizer, r["prompt"], r["response"]) for r in records]
    rows = pack(examples, cfg.train.seq_len)
    mesh = make_mesh(cfg.mesh)
    check_batch("train.batch_size", cfg.train.batch_size, cfg.mesh.rules, dict(mesh.shape))
    model = build_model(cfg, len(tokenizer), mesh)
    lora = cfg.train.lora
    wrt = nnx.Param
    if lora.enabled:
        from recranker_jax.llm.lora import apply_lora

        apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout, nnx.Rngs(cfg.run.seed + 1))
        wrt = nnx.LoRAParam
    shard_model(model, mesh, cfg.mesh.rules)
    t = cfg.train
    optimizer = nnx.Optimizer(
        model, make_optimizer(t.lr, t.warmup_steps, t.steps, t.weight_decay, t.clip_norm, t.accumulation), wrt=wrt
    )
    shard_optimizer(optimizer, mesh)
    primary = is_primary()  # with several processes all train and export; only process 0 writes files
    with open(folder.train_log, "w") if primary else contextlib.nullcontext() as handle:
        logs, reached = train(
            model, optimizer, rows, batch_size=t.batch_size, steps=t.steps, seed=cfg.run.seed,
            checkpoint_dir=checkpoint_dir, save_every=t.save_every, mesh=mesh, rules=cfg.mesh.rules,
            log=(lambda e: handle.write(json.dumps(dataclasses.asdict(e)) + "\n"))
            if primary else None,
            progress=progress and primary, schedule=learning_rate_schedule(t.lr, t.warmup_steps, t.steps),
            **throughput_model(cfg, model, mesh),
        )
    if reached < t.steps:
        raise RecRankerError("finetune was interrupted (SIGTERM); run the same command again to resume from its checkpoint")
    if lora.enabled:
        from recranker_jax.llm.lora import export_peft, merge_lora

        export_peft(model, folder.adapter, cfg.model.checkpoint or "recranker-from-scratch",  # a gather every
                    lora.targets, lora.rank, lora.alpha, lora.dropout)  # process joins; process 0 writes
        model = merge_lora(model)
    export_hf(model, folder.model)  # a gather every process joins
    if primary:
        tokenizer.save_pretrained(folder.model)
    summary = {
        "examples": len(examples), "packed_rows": len(rows), "steps": t.steps,
        "answer_tokens": int(rows.loss_mask.sum()),
        "parameters": int(sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "first_loss": logs[0].loss if logs else None, "last_loss": logs[-1].loss if logs else None,
        "median_tokens_per_second": float(np.median([e.tokens_per_second for e in logs[1:]])) if len(logs) > 1 else None,
        "median_mfu": float(np.median([e.mfu for e in logs[1:]])) if len(logs) > 1 and logs[-1].mfu is not None else None,
    }
    if primary:
        write_json(folder.summary, summary)
    return summary

