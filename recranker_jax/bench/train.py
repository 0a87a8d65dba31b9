"""`recranker bench train`: training-step throughput of this JAX implementation and of
transformers' PyTorch `LlamaForCausalLM` (with `peft` LoRA where the problem has adapters) on
the same problem, in the same run, on the same device (the CPU, or one CUDA GPU).

Problems (`PRESETS`; fixed sizes, so that result files from different machines compare):

- quickstart (default): the quickstart's CPU model: hidden 128, intermediate 344, 2 layers,
  4 heads, 2 KV heads, tied embeddings, vocabulary 4096; 4 rows x 1152 tokens; float32;
  every parameter trained; the loss over every position (a language model's).
- quickstart-answers: the same with the finetune's loss, on answer tokens only (rows of
  384-token examples ending in a 32-token answer, like the packed quickstart instructions):
  the JAX step runs the output head only there, PyTorch gets `labels` of -100 elsewhere.
- tiny-lora: a small float32 LoRA problem (r8 on q, v; 2 layers, hidden 64; 2 x 128 tokens),
  for the tests: JAX against PyTorch + PEFT on the CPU in seconds.
- 7b-lora: LLaMA-2 7B shapes (random weights), LoRA r8 on q, v (alpha 16, no dropout);
  bfloat16; 2 x 2048 tokens; remat auto (dots on accelerators). For accelerators: PyTorch +
  PEFT runs it on a CUDA GPU (bfloat16, AdamW on the adapters, gradient checkpointing).
- config: the run config's model (`model.*`, or `model.checkpoint`'s shape with random
  weights; vocabulary `prompts.tokenizer_vocab_size`), `train.seq_len`, `train.batch_size`,
  dtypes, remat and LoRA.

`remat` (`--remat` overrides any preset's) is the JAX side's policy (`llm.remat`). The PyTorch
side has one switch, transformers' gradient checkpointing (non-reentrant), which keeps each
layer's input and recomputes the layer, like remat full: it is on whenever the JAX side's
resolved policy rematerialises anything (minimal, dots, full) and off for none. Results record
each side's (`jax_remat`: the resolved policy; `torch_remat`: full or none).

Both sides get random tokens (one batch, reused every step) and start from the same weights:
the JAX initialisation (built in one compiled program on the device), written with
`export_hf` in the problem's parameter dtype and read with `from_pretrained`; with LoRA, the
JAX adapters' initial A and B too, written with `export_peft` and read with
`PeftModel.from_pretrained(..., is_trainable=True)` (PEFT keeps adapters in float32 on a
bfloat16 model, as the JAX side does). They train with the same loss, the mean next-token
cross-entropy over the scored positions (the finetune loss, one segment per row), and the
same optimizer on the trained weights (every weight, or the adapters): global-norm clipping,
then AdamW with the finetune warmup + cosine schedule. JAX runs `train.step.train_step`;
PyTorch runs forward with `labels=`, backward, `clip_grad_norm_`, `AdamW.step` with `sdpa`
attention (transformers' default; `eager` measured ~3x slower on the CPU) and, on CUDA,
float32 matmuls in TF32 as XLA's default does. The first losses of the two sides are
reported: equal up to rounding.

Where PyTorch runs (`torch_plan`): on the CPU when JAX does and the problem is float32; on
CUDA when JAX is on a GPU and torch has CUDA (float32 or bfloat16). Otherwise JAX runs alone
and the results say why (`jax_alone_because`): e.g. torch missing or without CUDA, JAX on a
TPU, --no-torch. A PyTorch process that fails to start (out of memory, say) also leaves JAX
alone, with its last error line as the reason.

Each side runs in its own process, so its peak resident memory (ru_maxrss; JAX's includes
compilation and writing the weights) and its peak device memory (GPU: JAX's
`peak_bytes_in_use`, torch's `max_memory_allocated`; None on the CPU) are its own. On a
shared GPU each side gets `GPU_MEMORY_FRACTION` of the device (JAX by
XLA_PYTHON_CLIENT_MEM_FRACTION unless already set, torch by
`set_per_process_memory_fraction`). The processes take turns, one timed step each,
alternating which goes first, so load from elsewhere on the machine falls on both alike; step
times are medians over the timed steps after warm-up steps (the first compiles; its seconds
are reported as first_step_seconds; setup_seconds is what came before it: imports, building
or loading the weights). PyTorch steps on CUDA are timed between `torch.cuda.synchronize()`
calls; JAX steps wait for the loss. tokens/s = batch_size * seq_len / step seconds; ratio =
JAX tokens/s / PyTorch tokens/s; MFU (both sides) = tokens/s x the JAX model's training FLOPs
per token (`hardware.llama_flops_per_token`) / the device's peak (None where unknown, e.g.
CPUs). `cpus` pins both processes to the listed CPUs (and PyTorch to that many threads).
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
import warnings
from collections.abc import Callable
from pathlib import Path

from recranker_jax.config import Config
from recranker_jax.errors import RecRankerError
from recranker_jax.hardware import mfu
from recranker_jax.instruments import StepProfiler, bench_profile_dir

SIDES = ("jax", "torch")
TORCH_ATTENTION = "sdpa"
PAUSE_SECONDS = 0.05  # between turns, so the other process's worker threads have gone idle
GPU_MEMORY_FRACTION = 0.45  # of the device, for each side, when both share one GPU
ADAPTER_DIR = "adapter"  # under the weights folder: the PEFT adapter of LoRA problems

_OPTIMIZER = {"lr": 1e-3, "warmup_steps": 15, "total_steps": 150, "weight_decay": 0.0, "clip_norm": 1.0}
PRESETS: dict[str, dict] = {
    "quickstart": {
        "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "seq_len": 1152, "batch_size": 4, "dtype": "float32", "param_dtype": "float32", "remat": "none",
        "lora": None, **_OPTIMIZER, "seed": 0, "loss": "all", "scan_layers": False,  # as configs/quickstart.yaml
    },
    "tiny-lora": {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "seq_len": 128, "batch_size": 2, "dtype": "float32", "param_dtype": "float32", "remat": "none",
        "lora": {"targets": ["q", "v"], "rank": 8, "alpha": 16.0}, **_OPTIMIZER, "lr": 1e-2, "warmup_steps": 2,
        "total_steps": 20, "seed": 0, "loss": "all",
    },
    "7b-lora": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "seq_len": 2048, "batch_size": 2, "dtype": "bfloat16", "param_dtype": "bfloat16", "remat": "auto",
        "lora": {"targets": ["q", "v"], "rank": 8, "alpha": 16.0}, **_OPTIMIZER, "lr": 1e-4, "seed": 0,
        "loss": "all",
    },
}
PRESETS["quickstart-answers"] = {**PRESETS["quickstart"], "loss": "answers"}
# "answers": rows of 384-token examples whose last 32 tokens are the answer (like the quickstart's
# packed instruction rows: ~3 examples and 33 answer tokens per row on average, 118 at most)
EXAMPLE_TOKENS, ANSWER_TOKENS = 384, 32


# ----------------------------------------------------------------------------- the problem

def problem_from_config(cfg: Config, preset: str = "quickstart", remat: str | None = None,
                        command: str = "bench train") -> dict:
    """The benchmark problem (a JSON-able dict): a preset, or `config` (the run config's sizes);
    `remat` overrides its JAX remat policy; `command` names the benchmark in errors."""
    if preset in PRESETS:
        # a preset fixes the problem; the attention kernel is how it runs (model.attention)
        problem = {**PRESETS[preset], "attention": cfg.model.attention}
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
                   "weight_decay": t.weight_decay, "clip_norm": t.clip_norm, "seed": cfg.run.seed, "loss": "all",
                   "scan_layers": m.scan_layers, "attention": m.attention}
    else:
        raise RecRankerError(f"{command}: --preset {preset!r}: expected one of {', '.join([*PRESETS, 'config'])}")
    if remat is not None:
        from recranker_jax.llm.remat import POLICIES

        if remat not in POLICIES:
            raise RecRankerError(f"{command}: --remat {remat!r}: expected one of {', '.join(POLICIES)}")
        problem["remat"] = remat
    problem["max_position_embeddings"] = max(problem.get("max_position_embeddings") or 0, problem["seq_len"])
    for key in ("vocab_size", "seq_len", "batch_size"):
        if problem[key] < 2:
            raise RecRankerError(f"{command}: {key}={problem[key]} is too small (expected at least 2)")
    return problem


def torch_plan(problem: dict, platform: str, status: dict | None) -> tuple[str | None, str | None]:
    """Where the PyTorch side runs: ("cpu" or "cuda", None), or (None, why JAX runs alone).
    `platform` is the JAX side's ("cpu", "gpu", "tpu"); `status` is `torch_status()`'s answer
    (None: no comparison asked for)."""
    if status is None:
        return None, "no PyTorch comparison asked for (--no-torch)"
    if platform not in ("cpu", "gpu"):
        return None, f"JAX runs on {platform}; PyTorch runs only on the CPU and CUDA GPUs here"
    if not status.get("torch"):
        return None, "torch is not installed" + (f" ({status['error']})" if status.get("error") else "")
    if not status.get("transformers"):
        return None, "transformers is not installed"
    if problem["lora"] and not status.get("peft"):
        return None, "peft is not installed (the PyTorch side of a LoRA problem needs it)"
    if problem["dtype"] != problem["param_dtype"]:
        return None, f"dtype {problem['dtype']} with param_dtype {problem['param_dtype']} has no PyTorch counterpart here"
    if platform == "cpu":
        if problem["dtype"] != "float32":
            return None, f"on the CPU PyTorch compares in float32 only (the problem is {problem['dtype']})"
        return "cpu", None
    if not status.get("cuda"):
        return None, f"torch {status['torch']} has no CUDA"
    return "cuda", None


def torch_remat(jax_remat: str) -> str:
    """The PyTorch side's counterpart of the JAX side's resolved remat policy: full (gradient
    checkpointing) whenever JAX rematerialises anything, else none."""
    return "none" if jax_remat == "none" else "full"


def _local_torch_status() -> dict:
    import importlib.util

    status = {"torch": None, "cuda": False, "transformers": importlib.util.find_spec("transformers") is not None,
              "peft": importlib.util.find_spec("peft") is not None}
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            status.update(torch=torch.__version__, cuda=bool(torch.cuda.is_available()))
        except Exception as error:  # a broken install: JAX runs alone and says why
            status["error"] = f"import torch failed: {type(error).__name__}: {error}"
    return status


def torch_status() -> dict:
    """{"torch": version or None, "cuda", "transformers", "peft"}: what the PyTorch side could use,
    asked in a separate process (this one neither imports torch nor touches the GPU)."""
    command = [sys.executable, "-m", "recranker_jax.bench.train", "probe"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line.removeprefix("BENCH "))
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    return {"torch": None, "error": lines[-1] if lines else f"the probe exited with {result.returncode}"}


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

def build_model(problem: dict):
    """The problem's `Llama` with its random initial weights, initialised by one compiled program
    on the default device (not op by op)."""
    from flax import nnx

    from recranker_jax.llm.llama import Llama

    config = _llama_config(problem)

    @nnx.jit
    def create() -> Llama:
        return Llama(config, nnx.Rngs(problem["seed"]), problem["dtype"], problem["param_dtype"], problem["remat"],
                     problem.get("scan_layers", True), problem.get("attention", "auto"))

    return create()


def jax_side(problem: dict, weights_dir: Path | None = None):
    """(step function returning the loss, model, optimizer) for `train_step` on the problem in
    the finetune's packed-batch form; writes the initial weights (and adapters) to `weights_dir`
    if given, for `torch_side`."""
    import numpy as np
    from flax import nnx

    from recranker_jax.train.packing import answer_capacity, batch_arrays
    from recranker_jax.parallel import place_batch
    from recranker_jax.train.step import make_optimizer, train_step

    model = build_model(problem)
    if weights_dir is not None:
        from recranker_jax.llm.hf_export import export_hf

        export_hf(model, weights_dir, problem["param_dtype"])
    wrt = nnx.Param
    if problem["lora"]:
        from recranker_jax.llm.lora import apply_lora, export_peft

        lora = problem["lora"]
        apply_lora(model, lora["targets"], lora["rank"], lora["alpha"], 0.0, nnx.Rngs(problem["seed"] + 1))
        if weights_dir is not None:
            export_peft(model, weights_dir / ADAPTER_DIR, str(weights_dir), lora["targets"], lora["rank"],
                        lora["alpha"], 0.0)
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


def torch_side(problem: dict, weights_dir: Path, attention: str = TORCH_ATTENTION, device: str = "cpu",
               checkpointing: bool = False):
    """(step function returning the loss, model): transformers' LlamaForCausalLM with the
    weights in `weights_dir` (in the problem's dtype, on `device`; with LoRA, wrapped by PEFT
    with the adapter written there), clip_grad_norm_ then AdamW on the trained weights, the
    same schedule; `checkpointing`: transformers' (non-reentrant) gradient checkpointing."""
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError:
        raise RecRankerError("bench train compares against PyTorch: pip install torch==2.13.0 (or the test extra)") from None
    torch.manual_seed(problem["seed"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[problem["dtype"]]
    model = LlamaForCausalLM.from_pretrained(weights_dir, attn_implementation=attention, dtype=dtype).to(device)
    if checkpointing:
        with warnings.catch_warnings():  # newer transformers call it activation checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if problem["lora"]:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, Path(weights_dir) / ADAPTER_DIR, is_trainable=True)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=problem["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=problem["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate(s, problem) / problem["lr"])
    ids = torch.from_numpy(random_tokens(problem).astype("int64"))
    labels = ids.clone()  # -100: not scored; the model shifts labels by one itself
    labels[:, 0] = -100
    labels[:, 1:][torch.from_numpy(loss_mask(problem)[:, :-1]) == 0] = -100
    ids, labels = ids.to(device), labels.to(device)

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

    from recranker_jax.hardware import environment, llama_flops_per_token, peak_flops

    device = jax.devices()[0]
    lora_parameters = int(sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))
    flops = llama_flops_per_token(model.config, problem["seq_len"], "lora" if problem["lora"] else "full", lora_parameters)
    return {"environment": {**environment(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                            "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")},
            "flops_per_token": flops, "peak_flops": peak_flops(device, problem["dtype"]), "remat": model.remat}


def _torch_info(problem: dict, device: str, checkpointing: bool) -> dict:
    import torch
    import transformers

    environment = {"torch": torch.__version__, "transformers": transformers.__version__,
                   "torch_threads": torch.get_num_threads(), "torch_attention": TORCH_ATTENTION,
                   "torch_device": device, "torch_cuda": torch.version.cuda,
                   "torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
                   "torch_memory_fraction": GPU_MEMORY_FRACTION if device == "cuda" else None}
    if problem["lora"]:
        import peft

        environment["peft"] = peft.__version__
    return {"environment": environment, "remat": "full" if checkpointing else "none"}


def _jax_device_peak_mb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None


def _torch_device_peak_mb(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None


# ----------------------------------------------------------------------------- worker processes

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _send(message: dict) -> None:
    sys.stdout.write("BENCH " + json.dumps(message) + "\n")
    sys.stdout.flush()


def _start_jax(problem: dict, weights_dir: str, options: dict) -> tuple[Callable[[], float], dict]:
    """The JAX side in its worker: decide where PyTorch runs (it needs the weights written only
    then), build, and describe."""
    import jax

    device, reason = torch_plan(problem, jax.devices()[0].platform, options.get("torch_status"))
    step, model, _ = jax_side(problem, Path(weights_dir) if weights_dir and device else None)
    info = {**_jax_info(problem, model), "torch_device": device, "jax_alone_because": reason}
    if options.get("profile"):
        step = profiled(step, StepProfiler(Path(options["profile_dir"]), options["profile"]))
    return step, info


def profiled(step: Callable[[], float], profiler: StepProfiler) -> Callable[[], float]:
    """`step` traced by `profiler` at its calls (counted from 1: the untimed steps first); the
    trace of steps the run never reaches ends when the worker quits (`profiled.close`)."""
    count = {"steps": 0}

    def run() -> float:
        count["steps"] += 1
        profiler.before(count["steps"])
        loss = step()  # a float: the step has run
        profiler.after(count["steps"])
        return loss

    run.close = profiler.close  # type: ignore[attr-defined]
    return run


def _start_torch(problem: dict, weights_dir: str, options: dict) -> tuple[Callable[[], float], dict, Callable]:
    import torch

    device, checkpointing = options["device"], torch_remat(options["remat"]) != "none"
    if options.get("cpus"):
        torch.set_num_threads(len(options["cpus"].split(",")))
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(GPU_MEMORY_FRACTION)
        torch.set_float32_matmul_precision("high")  # TF32, as XLA runs float32 matmuls on GPUs by default
    step, _ = torch_side(problem, Path(weights_dir), device=device, checkpointing=checkpointing)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return step, _torch_info(problem, device, checkpointing), synchronize


def _worker_main(argv: list[str]) -> None:
    """`python -m recranker_jax.bench.train SIDE PROBLEM_JSON WEIGHTS_DIR WARMUP OPTIONS_JSON`, then
    commands on stdin: `step` (one timed step; replies its seconds and loss) and `quit` (replies
    memory). `... probe` replies `torch_status()` and exits."""
    if argv == ["probe"]:
        _send(_local_torch_status())
        return
    started = time.perf_counter()
    side, problem_json, weights_dir, warmup, options_json = argv
    options = json.loads(options_json)
    if options.get("cpus"):  # before the frameworks size their thread pools
        os.sched_setaffinity(0, {int(c) for c in options["cpus"].split(",")})
    problem = json.loads(problem_json)
    synchronize: Callable[[], object] = lambda: None  # noqa: E731 (JAX steps wait for their loss)
    if side == "jax":
        step, info = _start_jax(problem, weights_dir, options)
    elif side == "torch":
        step, info, synchronize = _start_torch(problem, weights_dir, options)
    else:
        raise RecRankerError(f"bench train: unknown side {side!r}")

    def timed() -> tuple[float, float, float]:
        synchronize()
        begun, cpu_begun = time.perf_counter(), time.process_time()
        loss = step()
        synchronize()
        return time.perf_counter() - begun, time.process_time() - cpu_begun, loss

    setup_seconds = time.perf_counter() - started
    first_seconds, _, first_loss = timed()
    for _ in range(int(warmup) - 1):
        timed()
    _send({"first_loss": first_loss, "first_step_seconds": first_seconds, "setup_seconds": setup_seconds, **info})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            seconds, cpu_seconds, loss = timed()
            _send({"seconds": seconds, "cpu_seconds": cpu_seconds, "loss": loss})
        elif command == "quit":
            getattr(step, "close", lambda: None)()  # a profile of steps past the last one
            peak = _jax_device_peak_mb() if side == "jax" else _torch_device_peak_mb(options["device"])
            _send({"peak_rss_mb": round(_peak_rss_mb(), 1), "peak_device_memory_mb": peak})
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
            self.stderr = None


def worker(side: str, problem: dict, weights_dir: Path | None, warmup: int, options: dict | None = None,
           env: dict[str, str] | None = None) -> Worker:
    """A side's worker: `options` {"cpus": "0,1", "torch_status" (JAX), "device", "remat" (torch)}."""
    command = [sys.executable, "-m", "recranker_jax.bench.train", side, json.dumps(problem),
               str(weights_dir or ""), str(warmup), json.dumps(options or {})]
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

def _summary(raw: dict, tokens: int, flops_per_token: float, peak_flops: float | None) -> dict:
    seconds = statistics.median(raw["seconds"])
    return {"tokens_per_second": tokens / seconds, "step_seconds": seconds,
            "step_cpu_seconds": statistics.median(raw["cpu_seconds"]),
            "peak_rss_mb": raw["memory"]["peak_rss_mb"],
            "peak_device_memory_mb": raw["memory"]["peak_device_memory_mb"],
            "mfu": mfu(tokens / seconds, flops_per_token, peak_flops) if peak_flops else None,
            "first_step_seconds": raw["setup"]["first_step_seconds"], "setup_seconds": raw["setup"]["setup_seconds"],
            "first_loss": raw["setup"]["first_loss"], "last_loss": raw["losses"][-1], "remat": raw["setup"]["remat"]}


def _jax_env(status: dict | None) -> dict[str, str]:
    """The JAX worker's extra environment: its share of a GPU that torch may share (ignored on the CPU)."""
    if status and status.get("cuda") and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
        return {"XLA_PYTHON_CLIENT_MEM_FRACTION": str(GPU_MEMORY_FRACTION)}
    return {}


def _run_sides(problem: dict, warmup: int, repeats: int, cpus: str, status: dict | None,
               profile: dict | None = None) -> tuple[dict, str | None]:
    """Run JAX, then PyTorch where `torch_plan` puts it, interleaved; (raw replies, why JAX ran alone).
    `profile` ({"profile": [start, stop], "profile_dir"}) traces those JAX steps."""
    with tempfile.TemporaryDirectory(prefix="recranker-bench-train-") as weights_dir:
        jax_worker = worker("jax", problem, Path(weights_dir) if status else None, warmup,
                            {"cpus": cpus, "torch_status": status, **(profile or {})}, _jax_env(status))
        workers = [jax_worker]
        try:
            setup = jax_worker.start()
            reason = setup["jax_alone_because"]
            if setup["torch_device"]:
                torch_worker = worker("torch", problem, Path(weights_dir), warmup,
                                      {"cpus": cpus, "device": setup["torch_device"], "remat": setup["remat"]})
                try:
                    torch_worker.start()
                    workers.append(torch_worker)
                except RecRankerError as error:  # e.g. out of device memory: JAX's figures still stand
                    torch_worker.stop()
                    reason = str(error).removeprefix("bench train: ")
            return run_interleaved(workers, repeats), reason
        finally:
            for w in workers:
                w.stop()


def bench_train(cfg: Config, repeats: int = 5, preset: str = "quickstart", warmup: int = 2,
                compare_torch: bool = True, cpus: str | None = None, remat: str | None = None,
                profile: list[int] | None = None) -> dict:
    """Time the problem on JAX and, where `torch_plan` allows, PyTorch; `remat` overrides the
    preset's JAX remat policy; `profile` [start, stop] traces those JAX steps (counted from 1,
    the untimed ones first) into runs/<name>/bench/train/profile/ (`bench_profile_dir`).
    Returns the results document (`format_results` prints it)."""
    if repeats < 1 or warmup < 1:
        raise RecRankerError(f"bench train: repeats={repeats} and warmup={warmup} must be positive integers")
    cpus = ",".join(c.strip() for c in (cpus or "").split(",") if c.strip())
    if cpus and not all(c.isdigit() for c in cpus.split(",")):
        raise RecRankerError(f"bench train: cpus={cpus!r}: expected CPU numbers separated by commas, e.g. 0,1")
    problem = problem_from_config(cfg, preset, remat)
    tokens = problem["batch_size"] * problem["seq_len"]
    traced = {"profile": list(profile), "profile_dir": str(bench_profile_dir(cfg, "train").resolve())} if profile else None
    raw, reason = _run_sides(problem, warmup, repeats, cpus, torch_status() if compare_torch else None, traced)
    jax_setup = raw["jax"]["setup"]
    summary = {side: _summary(raw[side], tokens, jax_setup["flops_per_token"], jax_setup["peak_flops"]) for side in raw}
    train = {f"{side}_{key}": value for side in summary for key, value in summary[side].items()}
    environment = dict(jax_setup["environment"])
    if "torch" in raw:
        train["ratio"] = summary["jax"]["tokens_per_second"] / summary["torch"]["tokens_per_second"]
        environment.update(raw["torch"]["setup"]["environment"])
    train["jax_alone_because"] = reason
    environment["processor"] = platform.processor() or platform.machine()
    return {
        "benchmark": "train",
        "environment": environment,
        "results": {"train": train},
        "settings": {"preset": preset, "problem": problem, "tokens_per_step": tokens,
                     "flops_per_token": jax_setup["flops_per_token"], "peak_flops": jax_setup["peak_flops"],
                     "repeats": repeats, "untimed_steps": warmup, "interleaved": "torch" in raw, "cpus": cpus or None,
                     "step_seconds": {side: raw[side]["seconds"] for side in raw}},
    }


def _cell(value, spec: str, width: int) -> str:
    """`value` formatted by `spec` right-aligned in `width`, or '-' when there is none."""
    return f"{'-' if value is None else format(value, spec):>{width}}"


def _problem_line(settings: dict) -> str:
    p = settings["problem"]
    lora = p["lora"]
    adapters = f", LoRA r{lora['rank']} ({', '.join(lora['targets'])})" if lora else ""
    return (f"train/{settings['preset']}: {p['batch_size']} x {p['seq_len']} tokens, vocabulary {p['vocab_size']}, "
            f"hidden {p['hidden_size']}, {p['num_hidden_layers']} layers, {p['dtype']}{adapters}"
            f"{', loss on answer tokens' if p.get('loss') == 'answers' else ''}; median of {settings['repeats']} steps"
            f"{' (interleaved)' if settings['interleaved'] else ''}")


def format_results(doc: dict) -> str:
    train, settings, env = doc["results"]["train"], doc["settings"], doc["environment"]
    sides = [s for s in SIDES if f"{s}_tokens_per_second" in train]
    columns = (("tokens/s", "tokens_per_second", ".0f", 10), ("step s", "step_seconds", ".3f", 9),
               ("cpu s", "step_cpu_seconds", ".2f", 8), ("RSS MB", "peak_rss_mb", ".0f", 8),
               ("device MB", "peak_device_memory_mb", ".0f", 11), ("MFU", "mfu", ".1%", 7),
               ("first loss", "first_loss", ".5f", 12), ("1st step s", "first_step_seconds", ".1f", 12),
               ("setup s", "setup_seconds", ".1f", 9), ("remat", "remat", "", 9))
    rows = [_problem_line(settings), f"{'side':<8}" + "".join(f"{title:>{width}}" for title, _, _, width in columns)]
    for side in sides:
        rows.append(f"{side:<8}" + "".join(_cell(train.get(f"{side}_{key}"), spec, width)
                                           for _, key, spec, width in columns))
    if "ratio" in train:
        threads = env["torch_threads"]
        details = [env.get("torch_device", "cpu"), f"{threads} thread{'s' if threads != 1 else ''}",
                   f"{env['torch_attention']} attention"]
        if "peft" in env:
            details.append(f"peft {env['peft']}")
        if env.get("torch_memory_fraction"):
            details.append(f"each side {env['torch_memory_fraction']:.0%} of the device")
        rows.append(f"jax / torch tokens/s: x{train['ratio']:.2f} (torch: {', '.join(details)})")
    if train.get("jax_alone_because"):
        rows.append(f"JAX alone: {train['jax_alone_because']}")
    rows.append(f"XLA_FLAGS={env.get('xla_flags') or '(not set)'}" + (f"; pinned to CPUs {settings['cpus']}"
                                                                       if settings["cpus"] else ""))
    return "\n".join(rows)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
