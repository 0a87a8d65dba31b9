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
from recranker_jax.errors import Interrupted, RecRankerError
from recranker_jax.instruments import PROFILE, TENSORBOARD, Scalars, StepProfiler
from recranker_jax.llm.hf_export import export_hf
from recranker_jax.llm.hf_import import load_hf_llama
from recranker_jax.llm.llama import Llama, LlamaConfig, model_options
from recranker_jax.config_checks import check_batch
from recranker_jax.parallel import is_primary, make_mesh
from recranker_jax.prompts.tokenizer import encode_example, load_tokenizer
from recranker_jax.train.loop import train
from recranker_jax.train.packing import answer_capacity, pack
from recranker_jax.train.remat_choice import compiled_remat
from recranker_jax.run import FinetuneFolder, InstructionsFolder, PretrainFolder, read_jsonl, write_json
from recranker_jax.train.step import learning_rate_schedule, make_optimizer, shard_model, shard_optimizer


def tokenizer_folder(cfg: Config, instructions_dir: Path) -> Path:
    """prompts.tokenizer, or the one the instructions stage trained."""
    if cfg.prompts.tokenizer:
        return Path(cfg.prompts.tokenizer)
    return InstructionsFolder(instructions_dir).tokenizer


def build_model(cfg: Config, vocab_size: int, mesh=None, start: Path | None = None) -> Llama:
    """The model training starts from, placed on the mesh: `start` (a Hugging Face folder, the
    pretrain stage's model), else model.checkpoint, else a fresh model of the configured size."""
    m = cfg.model
    source = start or m.checkpoint
    if source:
        model = load_hf_llama(source, mesh, cfg.mesh.rules, **model_options(cfg))
        if model.config.vocab_size < vocab_size:
            raise RecRankerError(
                f"{source}: the model has {model.config.vocab_size} token embeddings but the "
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


def check_host_arrays(cfg: Config, schedule: "Schedule", batch_key: str, tokens: int) -> None:
    """Before packing: the packed rows (4 int32 arrays of rows x train.seq_len, at least
    tokens / seq_len rows) and one training batch (4 int32 arrays of batch_size x seq_len, and
    their gathered copy) fit the host's free memory (`config_checks.check_fits`)."""
    from recranker_jax.config_checks import check_fits
    from recranker_jax.hardware import host_memory_available

    free, seq_len = host_memory_available(), cfg.train.seq_len
    rows = max(-(-tokens // seq_len), 1)
    check_fits("train.seq_len", seq_len, 16 * rows, 0, free, f"packing {tokens:,} tokens into rows of that length",
               "this host's free memory")
    what = f"one training batch ({batch_key}={schedule.batch_size:,} x train.seq_len={seq_len:,} tokens) on the host"
    if _seq_len_named(seq_len, schedule.batch_size):
        check_fits("train.seq_len", seq_len, 32 * schedule.batch_size, 0, free, what, "this host's free memory")
    else:
        check_fits(batch_key, schedule.batch_size, 32 * seq_len, 0, free, what, "this host's free memory")


def _seq_len_named(seq_len: int, batch_size: int) -> bool:
    """Of a batch_size x seq_len size that cannot fit, name train.seq_len (rather than the batch
    size) when it is further above its default."""
    from recranker_jax.config import TrainConfig

    defaults = TrainConfig()
    return seq_len / defaults.seq_len >= batch_size / defaults.batch_size


def check_step_fits(cfg: Config, schedule: "Schedule", batch_key: str, model: Llama, wrt, mesh) -> None:
    """Before the first step: a lower bound of one training step's memory per device (weights,
    AdamW's moments and gradients of what trains, and each layer's input kept for the backward
    pass, b x s x hidden, spread as evenly as the mesh could) fits one device (`hardware.memory_capacity`).
    Names train.seq_len or the batch size, whichever is further above its default."""
    from recranker_jax.config_checks import check_fits
    from recranker_jax.hardware import memory_capacity, memory_spread

    def nbytes(state) -> int:
        return int(sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(state)))

    devices = memory_spread(mesh)
    weights = nbytes(nnx.state(model, nnx.Param))  # LoRA adapters included (LoRAParam is a Param)
    trainable = int(sum(v.size for v in jax.tree.leaves(nnx.state(model, wrt))))
    fixed = (weights + 12 * trainable) / devices
    c, b, s = model.config, schedule.batch_size, cfg.train.seq_len
    per_token = c.num_hidden_layers * c.hidden_size * jax.numpy.dtype(cfg.model.dtype).itemsize / devices
    capacity, where = memory_capacity(mesh.devices.flat[0])
    what = f"one {schedule.name} step ({batch_key}={b:,} x train.seq_len={s:,} tokens)"
    if _seq_len_named(s, b):
        check_fits("train.seq_len", s, b * per_token, fixed, capacity, what, where)
    else:
        check_fits(batch_key, b, s * per_token, fixed, capacity, what, where)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long and how fast one training stage runs (train.* for the finetune, pretrain.* for
    the pretrain stage); the model, mesh, LoRA, sequence length and checkpointing are train's."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    name: str  # the stage, for messages


COMPILATION_CACHE = ".jax_cache"  # under run.root


def use_compilation_cache(cfg: Config) -> Path | None:
    """JAX's persistent compilation cache in run.root (`run.compilation_cache`; auto: off the
    CPU), so a resumed or repeated run loads its compiled steps instead of compiling them again.
    Returns the folder, or None when off."""
    setting = cfg.run.compilation_cache
    if setting == "never" or (setting == "auto" and jax.default_backend() == "cpu"):
        return None
    folder = Path(cfg.run.root).expanduser().resolve() / COMPILATION_CACHE
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


def tune(cfg: Config, schedule: Schedule, examples: list[tuple[np.ndarray, np.ndarray]], tokenizer,
         start: Path | None, model_dir: Path, train_log: Path, checkpoint_dir: Path, progress: bool,
         adapter_dir: Path | None = None) -> dict:
    """Train the model on packed `examples` (ids, loss mask) from `start` (or model.checkpoint,
    or a fresh model) for `schedule.steps` steps (none: the starting model as it is), then
    export it with its tokenizer to `model_dir` (LoRA merged; the adapter in PEFT format to
    `adapter_dir`). Returns the summary. Every process joins; process 0 writes the files."""
    batch_key = f"{'pretrain' if schedule.name == 'pretrain' else 'train'}.batch_size"
    check_host_arrays(cfg, schedule, batch_key, sum(len(ids) for ids, _ in examples))
    rows = pack(examples, cfg.train.seq_len)
    use_compilation_cache(cfg)
    mesh = make_mesh(cfg.mesh)
    check_batch(batch_key, schedule.batch_size, cfg.mesh.rules, dict(mesh.shape))
    model = build_model(cfg, len(tokenizer), mesh, start)
    lora = cfg.train.lora
    wrt = nnx.Param
    if lora.enabled:
        from recranker_jax.llm.lora import apply_lora

        apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout, nnx.Rngs(cfg.run.seed + 1))
        wrt = nnx.LoRAParam
    shard_model(model, mesh, cfg.mesh.rules)
    check_step_fits(cfg, schedule, batch_key, model, wrt, mesh)
    t, s = cfg.train, schedule
    if s.steps:
        # on accelerators the compiler decides: auto's fastest policy that fits, or an over-size step refused
        model.remat = compiled_remat(cfg, model.config, mesh, answer_capacity(rows.loss_mask), checkpoint_dir,
                                     batch_key, schedule.batch_size) or model.remat
    logs, reached = [], 0
    primary = is_primary()  # with several processes all train and export; only process 0 writes files
    if s.steps:
        optimizer = nnx.Optimizer(
            model, make_optimizer(s.lr, s.warmup_steps, s.steps, t.weight_decay, t.clip_norm, t.accumulation), wrt=wrt
        )
        shard_optimizer(optimizer, mesh)
        with open(train_log, "w") if primary else contextlib.nullcontext() as handle:
            logs, reached = train(
                model, optimizer, rows, batch_size=s.batch_size, steps=s.steps, seed=cfg.run.seed,
                checkpoint_dir=checkpoint_dir, save_every=t.save_every, mesh=mesh, rules=cfg.mesh.rules,
                log=(lambda e: handle.write(json.dumps(dataclasses.asdict(e)) + "\n"))
                if primary else None,
                progress=progress and primary, schedule=learning_rate_schedule(s.lr, s.warmup_steps, s.steps),
                desc=s.name, **throughput_model(cfg, model, mesh),
                diverged_hint=f"{s.name if s.name == 'pretrain' else 'train'}.lr={s.lr}, with "
                              f"{s.name if s.name == 'pretrain' else 'train'}.warmup_steps={s.warmup_steps} and "
                              f"train.clip_norm={t.clip_norm}",
                scalars=Scalars(model_dir.parent / TENSORBOARD, "train", enabled=cfg.run.tensorboard and primary),
                profiler=StepProfiler(model_dir.parent / PROFILE, t.profile_steps) if primary else None,
            )
        if reached < s.steps:  # exit 130 for SIGTERM too: every process of a multi-host run stops the same way
            raise Interrupted(f"{s.name} was interrupted (SIGTERM or Ctrl-C) at step {reached}; run the same command "
                              "again to resume from its checkpoint")
    if lora.enabled:
        from recranker_jax.llm.lora import export_peft, merge_lora

        if adapter_dir is not None:
            export_peft(model, adapter_dir, str(start or cfg.model.checkpoint or "recranker-from-scratch"),  # a gather
                        lora.targets, lora.rank, lora.alpha, lora.dropout)  # every process joins; process 0 writes
        model = merge_lora(model)
    export_hf(model, model_dir)  # a gather every process joins
    if primary:
        tokenizer.save_pretrained(model_dir)
    return {
        "examples": len(examples), "packed_rows": len(rows), "steps": s.steps,
        "answer_tokens": int(rows.loss_mask.sum()),
        "parameters": int(sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "first_loss": logs[0].loss if logs else None, "last_loss": logs[-1].loss if logs else None,
        "median_tokens_per_second": float(np.median([e.tokens_per_second for e in logs[1:]])) if len(logs) > 1 else None,
        "median_mfu": float(np.median([e.mfu for e in logs[1:]])) if len(logs) > 1 and logs[-1].mfu is not None else None,
    }


def build_finetune(cfg: Config, instructions_dir: Path, out: Path, checkpoint_dir: Path, progress: bool = True,
                   pretrain_dir: Path | None = None) -> dict:
    """Instruction tuning from the pretrain stage's model (when pre-training is on), else from
    model.checkpoint or a fresh model; train.enabled=false exports the starting model untuned
    (the zero-shot baseline)."""
    tokenizer = load_tokenizer(tokenizer_folder(cfg, instructions_dir))
    train_file, folder = InstructionsFolder(instructions_dir).train, FinetuneFolder(out)
    records = read_jsonl(train_file)
    if not records:
        raise RecRankerError(f"{train_file} has no examples")
    examples = [encode_example(tokenizer, r["prompt"], r["response"]) for r in records]
    t = cfg.train
    schedule = Schedule(t.steps if t.enabled else 0, t.batch_size, t.lr, t.warmup_steps, "finetune")
    start = PretrainFolder(pretrain_dir).model if pretrain_dir is not None else None
    start = start if start is not None and start.is_dir() else None
    summary = tune(cfg, schedule, examples, tokenizer, start, folder.model, folder.train_log, checkpoint_dir, progress,
                   adapter_dir=folder.adapter if t.enabled else None)
    summary["pretrained"] = start is not None
    if is_primary():
        write_json(folder.summary, summary)
    return summary
