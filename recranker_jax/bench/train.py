"""`recranker bench train`: instruction-tuning step throughput of this JAX implementation
against transformers' PyTorch `LlamaForCausalLM` (float32, on the CPU), same problem.

Problem: the config's ranker model shape (`model.*`, or the shape in `model.checkpoint`'s
config.json), `train.batch_size` rows of `train.seq_len` random tokens drawn from a vocabulary
of `prompts.tokenizer_vocab_size` (the quickstart: hidden 128, intermediate 344, 2 layers,
4 heads, 2 KV heads, tied embeddings, vocabulary 4096, 4 x 1152 tokens). One batch is
reused every step. Both sides start from the same weights (the JAX model's initialisation,
exported with `export_hf` and loaded with `from_pretrained`), train every parameter with
the same loss (mean next-token cross-entropy over every position but the last: the
finetune loss with an all-ones answer mask, one segment per row) and the same optimizer
(AdamW after global-norm clipping, `train.lr` with the finetune warmup + cosine schedule,
`train.weight_decay`, `train.clip_norm`). JAX runs `train.step.train_step`; PyTorch runs
forward with `labels=`, backward, `clip_grad_norm_`, `AdamW.step` (attention: sdpa, the
faster of sdpa / eager here; see `TORCH_ATTENTION`).

Each side runs in its own process so its peak resident memory is its own; the two
processes take turns (one timed step each, alternating which goes first), so load from
elsewhere on the machine falls on both alike. Step times are medians over the timed steps,
after warm-up steps (the first compiles). tokens/s = batch_size * seq_len / step seconds.
Peak memory: the whole process's peak RSS (JAX's includes compilation) and the peak RSS
while the timed steps ran.
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
TORCH_ATTENTION = "sdpa"  # transformers' default; eager (materialised scores) measured ~3x slower here
PAUSE_SECONDS = 0.05  # between turns, so the other process's worker threads are idle


# ----------------------------------------------------------------------------- the problem

def problem_from_config(cfg: Config, vocab_size: int | None = None, seq_len: int | None = None,
                        batch_size: int | None = None) -> dict:
    """The benchmark problem (a JSON-able dict) from the config's model and train sections."""
    m, t = cfg.model, cfg.train
    if m.checkpoint:
        from recranker_jax.llm.hf_import import read_config

        shape = dataclasses.asdict(read_config(Path(m.checkpoint).expanduser()))
    else:
        shape = {"vocab_size": cfg.prompts.tokenizer_vocab_size, "hidden_size": m.hidden_size,
                 "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_hidden_layers,
                 "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.num_key_value_heads,
                 "rope_theta": m.rope_theta, "tie_word_embeddings": m.tie_word_embeddings}
    if vocab_size is not None:
        shape["vocab_size"] = vocab_size
    problem = {
        **shape,
        "seq_len": seq_len or t.seq_len, "batch_size": batch_size or t.batch_size,
        "lr": t.lr, "warmup_steps": t.warmup_steps, "total_steps": t.steps,
        "weight_decay": t.weight_decay, "clip_norm": t.clip_norm, "seed": cfg.run.seed,
    }
    problem["max_position_embeddings"] = max(problem.get("max_position_embeddings", 0), problem["seq_len"])
    for key in ("vocab_size", "seq_len", "batch_size"):
        if problem[key] < 2:
            raise RecRankerError(f"bench train: {key}={problem[key]} is too small (expected at least 2)")
    return problem


def learning_rate(step: int, problem: dict) -> float:
    """`train.step.make_optimizer`'s schedule in plain Python (so the PyTorch process needs no JAX)."""
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


def _llama_config(problem: dict):
    from recranker_jax.llm.llama import LlamaConfig

    names = [f.name for f in dataclasses.fields(LlamaConfig)]
    return LlamaConfig(**{k: problem[k] for k in names if k in problem})


# ----------------------------------------------------------------------------- the two sides

def jax_side(problem: dict, weights_dir: Path | None = None):
    """(step function returning the loss, the model): `train_step` on the packed-batch form of
    the problem; writes the initial weights to `weights_dir` (a Hugging Face folder)."""
    import numpy as np
    from flax import nnx

    from recranker_jax.llm.llama import Llama
    from recranker_jax.train.step import make_optimizer, place_batch, train_step

    model = Llama(_llama_config(problem), nnx.Rngs(problem["seed"]))
    if weights_dir is not None:
        from recranker_jax.llm.hf_export import export_hf

        export_hf(model, weights_dir)
    optimizer = nnx.Optimizer(
        model, make_optimizer(problem["lr"], problem["warmup_steps"], problem["total_steps"], problem["weight_decay"],
                              problem["clip_norm"]), wrt=nnx.Param)
    tokens = random_tokens(problem)
    rows, length = tokens.shape
    loss_mask = np.ones_like(tokens)
    loss_mask[:, -1] = 0  # the last position has no next token (as with Hugging Face's shifted labels)
    batch = place_batch({"tokens": tokens, "loss_mask": loss_mask, "segment_ids": np.ones_like(tokens),
                         "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()},
                        None, {})

    def step() -> float:
        return float(train_step(model, optimizer, batch))

    return step, model


def torch_side(problem: dict, weights_dir: Path, attention: str = TORCH_ATTENTION):
    """(step function returning the loss, the model): transformers' LlamaForCausalLM from the
    weights in `weights_dir`, AdamW after clip_grad_norm_, the same schedule."""
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

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, problem["clip_norm"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


# ----------------------------------------------------------------------------- worker processes

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: VmHWM); False where that is not available."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _window_peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _send(message: dict) -> None:
    sys.stdout.write("BENCH " + json.dumps(message) + "\n")
    sys.stdout.flush()


def _worker_main(argv: list[str]) -> None:
    """`python -m recranker_jax.bench.train SIDE PROBLEM_JSON WEIGHTS_DIR WARMUP`, then commands on
    stdin: `step` (one timed step; replies its seconds and loss) and `quit` (replies the summary)."""
    side, problem_json, weights_dir, warmup = argv
    problem = json.loads(problem_json)
    info: dict = {}
    if side == "jax":
        import jax

        step, _ = jax_side(problem, Path(weights_dir))
        info.update(xla_flags=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__, device=jax.devices()[0].device_kind)
    elif side == "torch":
        import torch
        import transformers

        step, _ = torch_side(problem, Path(weights_dir))
        info.update(torch=torch.__version__, transformers=transformers.__version__, torch_threads=torch.get_num_threads(),
                    torch_attention=TORCH_ATTENTION)
    else:
        raise RecRankerError(f"bench train: unknown side {side!r}")
    losses, warm_seconds = [], []
    for _ in range(int(warmup)):
        started = time.perf_counter()
        losses.append(step())
        warm_seconds.append(time.perf_counter() - started)
    windowed = _reset_peak_rss()
    _send({"ready": True, "first_loss": losses[0], "first_step_seconds": warm_seconds[0], **info})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            started, cpu_started = time.perf_counter(), time.process_time()
            loss = step()
            _send({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started, "loss": loss})
        elif command == "quit":
            _send({"peak_rss_mb": round(_peak_rss_mb(), 1),
                   "steps_peak_rss_mb": round(_window_peak_rss_mb(), 1) if windowed else None})
            return


@dataclasses.dataclass
class Worker:
    """One side's process: `command` started with `env` added to this process's environment."""

    name: str
    command: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    process: subprocess.Popen | None = None
    stderr: tempfile.TemporaryFile | None = None

    def start(self) -> dict:
        self.stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: chatty stderr cannot block the worker
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, env={**os.environ, **self.env})
        return self.receive()

    def receive(self) -> dict:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("BENCH "):
                return json.loads(line.removeprefix("BENCH "))
        self.process.wait()
        self.stderr.seek(0)
        lines = self.stderr.read().strip().splitlines()
        last = next((l for l in reversed(lines) if l.strip()), "no output")
        raise RecRankerError(f"bench train: the {self.name} process failed (exit {self.process.returncode}): {last}")

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


def run_interleaved(workers: list[Worker], repeats: int, pause: float = PAUSE_SECONDS) -> dict[str, dict]:
    """Start the workers one after another (each writes or reads the shared weights), then
    time `repeats` steps of each, taking turns; returns each worker's summary."""
    results = {}
    try:
        for worker in workers:
            results[worker.name] = {"setup": worker.start(), "seconds": [], "cpu_seconds": [], "losses": []}
        for r in range(repeats):
            for worker in workers if r % 2 == 0 else workers[::-1]:
                time.sleep(pause)
                reply = worker.ask("step")
                results[worker.name]["seconds"].append(reply["seconds"])
                results[worker.name]["cpu_seconds"].append(reply["cpu_seconds"])
                results[worker.name]["losses"].append(reply["loss"])
        for worker in workers:
            results[worker.name]["memory"] = worker.ask("quit")
            worker.process.wait(timeout=60)
    finally:
        for worker in workers:
            worker.stop()
    return results


def _worker(side: str, problem: dict, weights_dir: Path, warmup: int, env: dict[str, str] | None = None) -> Worker:
    command = [sys.executable, "-m", "recranker_jax.bench.train", side, json.dumps(problem), str(weights_dir), str(warmup)]
    return Worker(side, command, env or {})


# ----------------------------------------------------------------------------- the benchmark

def jax_environment() -> dict[str, str]:
    """Environment for the JAX process: XLA_FLAGS with this package's CPU defaults added."""
    from recranker_jax.xla_flags import with_cpu_flags

    return {"XLA_FLAGS": with_cpu_flags(os.environ.get("XLA_FLAGS", ""))}


def bench_train(cfg: Config, repeats: int = 5, warmup: int = 2, vocab_size: int | None = None,
                seq_len: int | None = None, batch_size: int | None = None) -> dict:
    """Time both sides on the config's problem; returns the results document."""
    if repeats < 1 or warmup < 1:
        raise RecRankerError(f"bench train: repeats={repeats} and warmup={warmup} must be positive")
    problem = problem_from_config(cfg, vocab_size, seq_len, batch_size)
    tokens = problem["batch_size"] * problem["seq_len"]
    with tempfile.TemporaryDirectory(prefix="recranker-bench-train-") as weights_dir:
        raw = run_interleaved([_worker("jax", problem, Path(weights_dir), warmup, jax_environment()),
                               _worker("torch", problem, Path(weights_dir), warmup)], repeats)
    summary = {}
    for side in SIDES:
        seconds = statistics.median(raw[side]["seconds"])
        summary[side] = {"step_seconds": seconds, "tokens_per_second": tokens / seconds,
                         "peak_rss_mb": raw[side]["memory"]["peak_rss_mb"],
                         "steps_peak_rss_mb": raw[side]["memory"]["steps_peak_rss_mb"],
                         "first_step_seconds": raw[side]["setup"]["first_step_seconds"],
                         "first_loss": raw[side]["setup"]["first_loss"], "last_loss": raw[side]["losses"][-1],
                         "step_seconds_all": raw[side]["seconds"]}
    jax_setup, torch_setup = raw["jax"]["setup"], raw["torch"]["setup"]
    train = {f"{side}_{key}": value for side in SIDES for key, value in summary[side].items()}
    train["ratio"] = summary["jax"]["tokens_per_second"] / summary["torch"]["tokens_per_second"]
    return {
        "benchmark": "train",
        "environment": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "jax": jax_setup["jax"], "device": jax_setup["device"], "xla_flags": jax_setup["xla_flags"],
            "torch": torch_setup["torch"], "transformers": torch_setup["transformers"],
            "torch_threads": torch_setup["torch_threads"], "torch_attention": torch_setup["torch_attention"],
        },
        "results": {"train": train},
        "settings": {"problem": problem, "tokens_per_step": tokens, "repeats": repeats, "warmup_steps": warmup,
                     "dtype": "float32", "interleaved": True},
    }


def format_results(doc: dict) -> str:
    train, problem = doc["results"]["train"], doc["settings"]["problem"]
    rows = [f"problem: {problem['batch_size']} x {problem['seq_len']} tokens, vocabulary {problem['vocab_size']}, "
            f"hidden {problem['hidden_size']}, {problem['num_hidden_layers']} layers; float32; "
            f"median of {doc['settings']['repeats']} interleaved steps",
            f"{'side':<8}{'tokens/s':>10}{'step s':>9}{'peak MB':>9}{'steps MB':>10}{'first loss':>12}"]
    for side in SIDES:
        window = train[f"{side}_steps_peak_rss_mb"]
        rows.append(f"{side:<8}{train[f'{side}_tokens_per_second']:>10.0f}{train[f'{side}_step_seconds']:>9.3f}"
                    f"{train[f'{side}_peak_rss_mb']:>9.0f}{'-' if window is None else f'{window:.0f}':>10}"
                    f"{train[f'{side}_first_loss']:>12.5f}")
    env = doc["environment"]
    rows.append(f"jax / torch tokens/s: x{train['ratio']:.2f} (torch {env['torch_threads']} threads, "
                f"{env['torch_attention']} attention; XLA_FLAGS={env['xla_flags'] or '(none)'})")
    return "\n".join(rows)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
