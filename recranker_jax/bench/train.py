"""`recranker bench train`: training-step throughput of this JAX implementation and, on the CPU,
of transformers' PyTorch `LlamaForCausalLM` on the same problem, in the same run.

Problems (`PRESETS`; fixed sizes, so that result files from different machines compare):

- quickstart (default): the quickstart's CPU model: hidden 128, intermediate 344, 2 layers,
  4 heads, 2 KV heads, tied embeddings, vocabulary 4096; 4 rows x 1152 tokens; float32;
  every parameter trained; the loss over every position (a language model's).
- quickstart-answers: the same with the finetune's loss, on answer tokens only (rows of
  384-token examples ending in a 32-token answer, like the packed quickstart instructions):
  the JAX step runs the output head only there, PyTorch gets `labels` of -100 elsewhere.
- 7b-lora: LLaMA-2 7B shapes (random weights), LoRA r8 on q, v; bfloat16; 2 x 2048 tokens;
  remat. For accelerators; JAX only.
- config: the run config's model (`model.*`, or `model.checkpoint`'s shape with random
  weights; vocabulary `prompts.tokenizer_vocab_size`), `train.seq_len`, `train.batch_size`,
  dtypes, remat and LoRA.

Both sides get random tokens (one batch, reused every step) and start from the same weights
(the JAX initialisation, written with `export_hf`, read with `from_pretrained`). They train
with the same loss, the mean next-token cross-entropy over the scored positions (the finetune
loss, one segment per row), and the same optimizer:
global-norm clipping, then AdamW with the finetune warmup + cosine schedule. JAX runs
`train.step.train_step`; PyTorch runs forward with `labels=`, backward, `clip_grad_norm_`,
`AdamW.step` with `sdpa` attention (transformers' default; `eager` measured ~3x slower here).
The first losses of the two sides are reported: equal up to float32 rounding.

Each side runs in its own process, so its peak resident memory (ru_maxrss; JAX's includes
compilation) is its own. The processes take turns, one timed step each, alternating which
goes first, so load from elsewhere on the machine falls on both alike; step times are
medians over the timed steps after warm-up steps (the first compiles). tokens/s =
batch_size * seq_len / step seconds; ratio = JAX tokens/s / PyTorch tokens/s. `cpus` pins
both processes to the listed CPUs (and PyTorch to that many threads).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recranker_jax.config import Config
from recranker_jax.errors import RecRankerError

SIDES = ("jax", "torch")
TORCH_ATTENTION = "sdpa"
PAUSE_SECONDS = 0.05  # between turns, so the other process's worker threads have gone idle

_OPTIMIZER = {"lr": 1e-3, "warmup_steps": 15, "total_steps": 150, "weight_decay": 0.0, "clip_norm": 1.0}
PRESETS: dict[str, dict] = {
    "quickstart": {
        "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "seq_len": 1152, "batch_size": 4, "dtype": "float32", "param_dtype": "float32", "remat": False,
        "lora": None, **_OPTIMIZER, "seed": 0, "loss": "all",
    },
    "7b-lora": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "seq_len": 2048, "batch_size": 2, "dtype": "bfloat16", "param_dtype": "bfloat16", "remat": True,
        "lora": {"targets": ["q", "v"], "rank": 8, "alpha": 16.0}, **_OPTIMIZER, "lr": 1e-4, "seed": 0,
        "loss": "all",
    },
}
PRESETS["quickstart-answers"] = {**PRESETS["quickstart"], "loss": "answers"}
# "answers": rows of 384-token examples whose last 32 tokens are the answer (like the quickstart's
# packed instruction rows: ~3 examples and 33 answer tokens per row on average, 118 at most)
EXAMPLE_TOKENS, ANSWER_TOKENS = 384, 32


# ----------------------------------------------------------------------------- the problem

def problem_from_config(cfg: Config, preset: str = "quickstart") -> dict:
    """The benchmark problem (a JSON-able dict): a preset, or `config` (the run config's sizes)."""
    if preset in PRESETS:
        problem = dict(PRESETS[preset])
    elif preset == "config":
        m, t = cfg.model, cfg.train
        if m.checkpoint:
            from recranker_jax.llm.hf_import import read_config

            shape = dataclasses.asdict(read_config(Path(m.checkpoint).expanduser()))
        else:
            shape = {"vocab_size": cfg.prompts.tokenizer_vocab_size, "hidden_size": m.hidden_size,
                     "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_hidden_layers,
                     "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.num_key_value_heads,
                     "rope_theta": m.rope_theta, "tie_word_embeddings": m.tie_word_embeddings}
        lora = t.lora
        problem = {**shape, "seq_len": t.seq_len, "batch_size": t.batch_size, "dtype": m.dtype,
                   "param_dtype": m.param_dtype, "remat": t.remat,
                   "lora": {"targets": list(lora.targets), "rank": lora.rank, "alpha": lora.alpha} if lora.enabled else None,
                   "lr": t.lr, "warmup_steps": t.warmup_steps, "total_steps": t.steps,
                   "weight_decay": t.weight_decay, "clip_norm": t.clip_norm, "seed": cfg.run.seed, "loss": "all"}
    else:
        raise RecRankerError(f"bench train: preset {preset!r}: expected one of {', '.join([*PRESETS, 'config'])}")
    problem["max_position_embeddings"] = max(problem.get("max_position_embeddings") or 0, problem["seq_len"])
    for key in ("vocab_size", "seq_len", "batch_size"):
        if problem[key] < 2:
            raise RecRankerError(f"bench train: {key}={problem[key]} is too small (expected at least 2)")
    return problem


def torch_comparable(problem: dict) -> bool:
    """Whether the PyTorch side runs the same problem: float32, every parameter trained."""
    return problem["dtype"] == "float32" and problem["param_dtype"] == "float32" and not problem["lora"]


def learning_rate(step: int, problem: dict) -> float:
    """`train.step.make_optimizer`'s schedule in plain Python (the PyTorch process imports no JAX)."""
    warmup = max(problem["warmup_steps"], 1)
    total = max(problem["total_steps"], warmup + 1)
    if step < warmup:
        return problem["lr"] * step / warmup
    done = min(step - warmup, total - warmup)
    return problem["lr"] * 0.5 * (1.0 + math.cos(math.pi * done / (total - warmup)))


def random_tokens(problem: dict):
    import numpy as np

    rng = np.random.default_rng([problem["seed"], 7])
    return rng.integers(0, problem["vocab_size"], (problem["batch_size"], problem["seq_len"])).astype(np.int32)


def loss_mask(problem: dict):
    """[B, T] 1 where the next token is scored: every position but the last (`loss` "all", the
    language-model loss), or ("answers") only the answer tokens of instruction examples."""
    import numpy as np

    length = problem["seq_len"]
    mask = np.ones((problem["batch_size"], length), np.int32)
    if problem.get("loss", "all") == "answers":
        scored = (np.arange(length) + 1) % EXAMPLE_TOKENS >= EXAMPLE_TOKENS - ANSWER_TOKENS  # token t+1 is an answer
        mask = mask * scored[None].astype(np.int32)
    mask[:, -1] = 0  # the last position has no next token (Hugging Face's shifted labels)
    return mask


def _llama_config(problem: dict):
    from recranker_jax.llm.llama import LlamaConfig

    names = [f.name for f in dataclasses.fields(LlamaConfig)]
    return LlamaConfig(**{k: problem[k] for k in names if k in problem})


# ----------------------------------------------------------------------------- the two sides

def jax_side(problem: dict, weights_dir: Path | None = None):
    """(step function returning the loss, model, optimizer) for `train_step` on the problem in
    the finetune's packed-batch form; writes the initial weights to `weights_dir` if given."""
    import numpy as np
    from flax import nnx

    from recranker_jax.llm.llama import Llama
    from recranker_jax.train.packing import answer_capacity, batch_arrays
    from recranker_jax.train.step import make_optimizer, place_batch, train_step

    model = Llama(_llama_config(problem), nnx.Rngs(problem["seed"]), problem["dtype"], problem["param_dtype"],
                  problem["remat"])
    if weights_dir is not None:
        from recranker_jax.llm.hf_export import export_hf

        export_hf(model, weights_dir)
    wrt = nnx.Param
    if problem["lora"]:
        from recranker_jax.llm.lora import apply_lora

        lora = problem["lora"]
        apply_lora(model, lora["targets"], lora["rank"], lora["alpha"], 0.0, nnx.Rngs(problem["seed"] + 1))
        wrt = nnx.LoRAParam
    optimizer = nnx.Optimizer(
        model, make_optimizer(problem["lr"], problem["warmup_steps"], problem["total_steps"], problem["weight_decay"],
                              problem["clip_norm"]), wrt=wrt)
    tokens = random_tokens(problem)
    rows, length = tokens.shape
    mask = loss_mask(problem)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    batch = place_batch(batch_arrays(tokens, mask, np.ones_like(tokens), positions, answer_capacity(mask)), None, {})

    def step() -> float:
        return float(train_step(model, optimizer, batch))

    return step, model, optimizer


def torch_side(problem: dict, weights_dir: Path, attention: str = TORCH_ATTENTION):
    """(step function returning the loss, model): transformers' LlamaForCausalLM with the
    weights in `weights_dir`, clip_grad_norm_ then AdamW, the same schedule."""
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError:
        raise RecRankerError("bench train compares against PyTorch: pip install torch==2.13.0 (or the test extra)") from None
    torch.manual_seed(problem["seed"])
    model = LlamaForCausalLM.from_pretrained(weights_dir, attn_implementation=attention, dtype=torch.float32)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=problem["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=problem["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate(s, problem) / problem["lr"])
    ids = torch.from_numpy(random_tokens(problem).astype("int64"))
    labels = ids.clone()  # -100: not scored; the model shifts labels by one itself
    labels[:, 0] = -100
    labels[:, 1:][torch.from_numpy(loss_mask(problem)[:, :-1]) == 0] = -100

    def step() -> float:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, problem["clip_norm"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def _jax_info(problem: dict, model) -> dict:
    import jax
    from flax import nnx

    from recranker_jax.bench.hardware import (
        environment,
        llama_flops_per_token,
        peak_flops,
    )

    device = jax.devices()[0]
    lora_parameters = int(sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))
    flops = llama_flops_per_token(model.config, problem["seq_len"], "lora" if problem["lora"] else "full", lora_parameters)
    return {"environment": {**environment(), "xla_flags": os.environ.get("XLA_FLAGS", "")},
            "flops_per_token": flops, "peak_flops": peak_flops(device, problem["dtype"])}


def _device_peak_mb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None


# ----------------------------------------------------------------------------- worker processes

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _send(message: dict) -> None:
    sys.stdout.write("BENCH " + json.dumps(message) + "\n")
    sys.stdout.flush()


def _worker_main(argv: list[str]) -> None:
    """`python -m recranker_jax.bench.train SIDE PROBLEM_JSON WEIGHTS_DIR WARMUP CPUS`, then commands
    on stdin: `step` (one timed step; replies its seconds and loss) and `quit` (replies memory)."""
    side, problem_json, weights_dir, warmup, cpus = argv
    if cpus:  # before the frameworks size their thread pools
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    problem = json.loads(problem_json)
    info: dict = {}
    if side == "jax":
        step, model, _ = jax_side(problem, Path(weights_dir) if weights_dir else None)
        info = _jax_info(problem, model)
    elif side == "torch":
        import torch
        import transformers

        if cpus:
            torch.set_num_threads(len(cpus.split(",")))
        step, _ = torch_side(problem, Path(weights_dir))
        info = {"environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                                "torch_threads": torch.get_num_threads(), "torch_attention": TORCH_ATTENTION}}
    else:
        raise RecRankerError(f"bench train: unknown side {side!r}")
    losses, first_seconds = [], None
    for _ in range(int(warmup)):
        started = time.perf_counter()
        losses.append(step())
        first_seconds = first_seconds or time.perf_counter() - started
    _send({"first_loss": losses[0], "first_step_seconds": first_seconds, **info})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            started, cpu_started = time.perf_counter(), time.process_time()
            loss = step()
            _send({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
                   "loss": loss})
        elif command == "quit":
            _send({"peak_rss_mb": round(_peak_rss_mb(), 1),
                   "peak_device_memory_mb": _device_peak_mb() if side == "jax" else None})
            return


@dataclasses.dataclass
class Worker:
    """One side's process: `command`, with `env` added to this process's environment."""

    name: str
    command: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    process: subprocess.Popen | None = None
    stderr: object | None = None
    setup: dict | None = None

    def start(self) -> dict:
        """Start the process (once) and return its first reply: set up, warmed up, ready."""
        if self.process is None:
            self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop); a file, not a pipe
            self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=self.stderr, text=True, env={**os.environ, **self.env})
            self.setup = self.receive()
        return self.setup

    def receive(self) -> dict:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("BENCH "):
                return json.loads(line.removeprefix("BENCH "))
        self.process.wait()
        self.stderr.seek(0)
        lines = [l for l in self.stderr.read().splitlines() if l.strip()]
        raise RecRankerError(f"bench train: the {self.name} process failed (exit {self.process.returncode}): "
                             f"{lines[-1] if lines else 'no output'}")

    def ask(self, command: str) -> dict:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.receive()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.stderr is not None:
            self.stderr.close()


def worker(side: str, problem: dict, weights_dir: Path | None, warmup: int, cpus: str = "",
           env: dict[str, str] | None = None) -> Worker:
    command = [sys.executable, "-m", "recranker_jax.bench.train", side, json.dumps(problem),
               str(weights_dir or ""), str(warmup), cpus]
    return Worker(side, command, env or {})


def run_interleaved(workers: list[Worker], repeats: int, pause: float = PAUSE_SECONDS) -> dict[str, dict]:
    """Start the workers one after another (the first writes the weights the others read) unless
    started already, then time `repeats` steps of each, taking turns; returns their replies."""
    results: dict[str, dict] = {}
    try:
        for w in workers:
            results[w.name] = {"setup": w.start(), "seconds": [], "cpu_seconds": [], "losses": []}
        for r in range(repeats):
            for w in workers if r % 2 == 0 else workers[::-1]:
                time.sleep(pause)
                reply = w.ask("step")
                for key, plural in (("seconds", "seconds"), ("cpu_seconds", "cpu_seconds"), ("loss", "losses")):
                    results[w.name][plural].append(reply[key])
        for w in workers:
            results[w.name]["memory"] = w.ask("quit")
            w.process.wait(timeout=60)
    finally:
        for w in workers:
            w.stop()
    return results


# ----------------------------------------------------------------------------- the benchmark

def _summary(raw: dict, tokens: int) -> dict:
    seconds = statistics.median(raw["seconds"])
    return {"tokens_per_second": tokens / seconds, "step_seconds": seconds,
            "step_cpu_seconds": statistics.median(raw["cpu_seconds"]),
            "peak_rss_mb": raw["memory"]["peak_rss_mb"], "first_step_seconds": raw["setup"]["first_step_seconds"],
            "first_loss": raw["setup"]["first_loss"], "last_loss": raw["losses"][-1]}


def bench_train(cfg: Config, repeats: int = 5, preset: str = "quickstart", warmup: int = 2,
                compare_torch: bool = True, cpus: str | None = None) -> dict:
    """Time the problem on JAX and (on the CPU, for float32 full fine-tuning) PyTorch; returns
    the results document (`format_results` prints it)."""
    if repeats < 1 or warmup < 1:
        raise RecRankerError(f"bench train: repeats={repeats} and warmup={warmup} must be positive integers")
    cpus = ",".join(c.strip() for c in (cpus or "").split(",") if c.strip())
    if cpus and not all(c.isdigit() for c in cpus.split(",")):
        raise RecRankerError(f"bench train: cpus={cpus!r}: expected CPU numbers separated by commas, e.g. 0,1")
    problem = problem_from_config(cfg, preset)
    tokens = problem["batch_size"] * problem["seq_len"]
    compare = compare_torch and torch_comparable(problem)
    with tempfile.TemporaryDirectory(prefix="recranker-bench-train-") as weights_dir:
        jax_worker = worker("jax", problem, Path(weights_dir) if compare else None, warmup, cpus)
        workers = [jax_worker]
        try:
            if compare and jax_worker.start()["environment"]["platform"] == "cpu":  # PyTorch runs on the CPU
                workers.append(worker("torch", problem, Path(weights_dir), warmup, cpus))
            raw = run_interleaved(workers, repeats)
        finally:
            jax_worker.stop()
    summary = {side: _summary(raw[side], tokens) for side in raw}
    jax_setup = raw["jax"]["setup"]
    if jax_setup["peak_flops"]:
        summary["jax"]["mfu"] = summary["jax"]["tokens_per_second"] * jax_setup["flops_per_token"] / jax_setup["peak_flops"]
    if raw["jax"]["memory"]["peak_device_memory_mb"] is not None:
        summary["jax"]["peak_device_memory_mb"] = raw["jax"]["memory"]["peak_device_memory_mb"]
    train = {f"{side}_{key}": value for side in summary for key, value in summary[side].items()}
    environment = dict(jax_setup["environment"])
    if "torch" in raw:
        train["ratio"] = summary["jax"]["tokens_per_second"] / summary["torch"]["tokens_per_second"]
        environment.update(raw["torch"]["setup"]["environment"])
    environment["processor"] = platform.processor() or platform.machine()
    return {
        "benchmark": "train",
        "environment": environment,
        "results": {"train": train},
        "settings": {"preset": preset, "problem": problem, "tokens_per_step": tokens,
                     "flops_per_token": jax_setup["flops_per_token"], "repeats": repeats, "untimed_steps": warmup,
                     "interleaved": "torch" in raw, "cpus": cpus or None,
                     "step_seconds": {side: raw[side]["seconds"] for side in raw}},
    }


def format_results(doc: dict) -> str:
    train, settings = doc["results"]["train"], doc["settings"]
    p = settings["problem"]
    sides = [s for s in SIDES if f"{s}_tokens_per_second" in train]
    rows = [(f"train/{settings['preset']}: {p['batch_size']} x {p['seq_len']} tokens, vocabulary {p['vocab_size']}, "
             f"hidden {p['hidden_size']}, {p['num_hidden_layers']} layers, {p['dtype']}"
             f"{', LoRA' if p['lora'] else ''}{', loss on answer tokens' if p.get('loss') == 'answers' else ''}; median of {settings['repeats']} steps"
             f"{' (interleaved)' if settings['interleaved'] else ''}"),
            f"{'side':<8}{'tokens/s':>10}{'step s':>9}{'cpu s':>8}{'peak MB':>9}{'first loss':>12}{'1st step s':>12}"]
    for side in sides:
        rows.append(f"{side:<8}{train[f'{side}_tokens_per_second']:>10.0f}{train[f'{side}_step_seconds']:>9.3f}"
                    f"{train[f'{side}_step_cpu_seconds']:>8.2f}{train[f'{side}_peak_rss_mb']:>9.0f}"
                    f"{train[f'{side}_first_loss']:>12.5f}{train[f'{side}_first_step_seconds']:>12.1f}")
    if "jax_mfu" in train:
        rows.append(f"jax MFU {train['jax_mfu']:.1%}" + (f", peak device memory {train['jax_peak_device_memory_mb']:.0f} MB"
                                                          if "jax_peak_device_memory_mb" in train else ""))
    env = doc["environment"]
    if "ratio" in train:
        rows.append(f"jax / torch tokens/s: x{train['ratio']:.2f} (torch: {env['torch_threads']} thread{'s' if env['torch_threads'] != 1 else ''}, "
                    f"{env['torch_attention']} attention)")
    rows.append(f"XLA_FLAGS={env.get('xla_flags') or '(not set)'}" + (f"; pinned to CPUs {settings['cpus']}"
                                                                       if settings["cpus"] else ""))
    return "\n".join(rows)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
