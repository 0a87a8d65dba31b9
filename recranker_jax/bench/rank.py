"""`recranker bench rank`: seconds per scored candidate of the batched, prefix-cached scorers
against generate-and-parse (the reference's way), on the same model and prompts.

Presets (`--preset`): the model both modes run.

- run (default): the run's tuned model (it runs the missing stages first, finetune included);
  generation stops at EOS, as in the rank stage.
- 7b: LLaMA-2 7B shapes (hidden 4096, intermediate 11008, 32 layers, 32 heads and KV heads,
  untied head) with the run tokenizer's vocabulary; random weights, bfloat16 weights and
  compute, built on the device under jit. For accelerators.
- tiny: the same code path at 2 layers, hidden 64 (for tests).

The random presets need only the run's data, retrieval and instructions stages (they run the
missing ones, never finetune). Random weights never emit EOS, so generate-and-parse answers
with exactly the length of a real answer: 2 tokens pointwise and pairwise (an answer such as
" 4" or " Yes", then EOS), `rank.generate_tokens` (96, the reference's) listwise. `--layers N`
runs a random preset at N layers.

Both modes score the same users' pointwise, pairwise and listwise prompts (in that order of
names: listwise, pairwise, pointwise); each task is timed after one warm-up pass on the same
inputs, and an item is one (user, candidate). A mode and task's compile seconds are its warm-up
pass's seconds minus its timed pass's (the median): a task compiles only the shapes an earlier
task of the mode did not (pointwise mostly reuses pairwise's). `compilations` and
`xla_compile_seconds` count every XLA compilation of the benchmark (model initialisation
included) and their backend seconds.

For pointwise and pairwise it also reports the prompt-token ratio: the tokens generate-and-parse
runs (every prompt whole) over those the scorers run (each user's prefix once, then every
question's suffix). With generation this short, it bounds the speed-up prefix caching can give.

Unless `--no-torch`, transformers' `LlamaForCausalLM.generate` also runs (greedy, the same
answer lengths, the same batches of prompts, sdpa attention) on the same device with the same
weights (shared through DLPack, not copied), timed after a warm-up on one batch of each task:
seconds per candidate as `torch_generate_*`. Skipped, with the reason in `settings.torch`,
when torch or transformers is missing or cannot reach JAX's device; a failure there is
reported there too and never loses the JAX figures.

Results (`results.rank`, for `bench compare`): <mode>_seconds_per_item, <mode>_items_per_second,
<mode>_<task>_seconds_per_item, <mode>_compile_seconds, <mode>_<task>_compile_seconds for the
modes scores and generate; speedup and <task>_speedup (generate / scores); <task>_prompt_token_ratio;
torch_generate_* and torch_speedup (torch generate / scores); model_init_seconds (built or
loaded), compilations, xla_compile_seconds. `settings` holds the model's shape and dtypes and
the generated answer lengths.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from recranker_jax.config import Config
from recranker_jax.errors import RecRankerError

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "rope_theta": 10000.0, "tie_word_embeddings": False}
PRESETS = {"7b": LLAMA2_7B,
           "tiny": {**LLAMA2_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 4}}
RANDOM_DTYPE = "bfloat16"
SHORT_ANSWER_TOKENS = 2  # pointwise " 4" and pairwise " Yes", then EOS
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
MODES = ("scores", "generate")


def check_arguments(users: int, repeats: int, preset: str, layers: int | None) -> None:
    if users < 1 or repeats < 1:
        raise RecRankerError(f"--users {users} / --repeats {repeats}: expected positive integers")
    if preset != "run" and preset not in PRESETS:
        raise RecRankerError(f"--preset {preset}: expected one of run, {', '.join(PRESETS)}")
    if layers is not None and (preset == "run" or layers < 1):
        raise RecRankerError(f"--layers {layers}: expected a positive integer, with a random preset ({', '.join(PRESETS)})")


def needed_stage(preset: str) -> str:
    """The last stage the preset needs (run: the tuned model; random weights: the prompts)."""
    return "finetune" if preset == "run" else "instructions"


def random_llama(cfg: Config, shape: dict, vocab_size: int):
    """A LLaMA of `shape` with random bfloat16 weights, created on the device under jit (a 7B
    model never passes through the host); the run's `model.scan_layers` and `model.attention`."""
    from flax import nnx

    from recranker_jax.llm.llama import Llama, LlamaConfig, model_options

    config = LlamaConfig(vocab_size=vocab_size, **shape)
    options = {**model_options(cfg, training=False), "dtype": RANDOM_DTYPE, "param_dtype": RANDOM_DTYPE}

    @nnx.jit
    def build():
        return Llama(config, nnx.Rngs(cfg.run.seed), **options)

    return build()


def model_settings(model, preset: str, seconds: float) -> dict:
    import jax
    from flax import nnx

    c = model.config
    params = nnx.state(model, nnx.Param)
    return {"preset": preset, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "tie_word_embeddings": c.tie_word_embeddings, "parameters": int(sum(p.size for p in jax.tree.leaves(params))),
            "param_dtype": str(jax.tree.leaves(params)[0].dtype), "dtype": str(jax.numpy.dtype(model.dtype)),
            "scan_layers": model.scan_layers, "init_seconds": seconds}


def build_ranker(cfg: Config, preset: str, layers: int | None, data, finetune_dir):
    """(Ranker, model settings): the tuned model, or random weights with fixed answer lengths."""
    import jax
    from flax import nnx

    from recranker_jax.prompts.tokenizer import load_tokenizer
    from recranker_jax.rank.ranker import load_ranker
    from recranker_jax.run import RunFolder
    from recranker_jax.train.stage import tokenizer_folder

    instructions_dir = RunFolder.of(cfg).instructions.path
    started = time.perf_counter()
    if preset == "run":
        ranker = load_ranker(cfg, data, instructions_dir, finetune_dir)
    else:
        tokenizer = load_tokenizer(tokenizer_folder(cfg, instructions_dir))
        shape = {**PRESETS[preset], **({"num_hidden_layers": layers} if layers else {})}
        ranker = load_ranker(cfg, data, instructions_dir, None, random_llama(cfg, shape, len(tokenizer)), tokenizer)
        ranker.eos = None  # random weights never stop: answers of a real answer's length
        ranker.generate_tokens = {"pointwise": SHORT_ANSWER_TOKENS, "pairwise": SHORT_ANSWER_TOKENS,
                                  "listwise": cfg.rank.generate_tokens}
    jax.block_until_ready(nnx.state(ranker.model))
    return ranker, model_settings(ranker.model, preset, time.perf_counter() - started)


@contextlib.contextmanager
def counting_compilations():
    """{"compilations", "seconds"} of the XLA compilations while inside."""
    import jax

    counts = {"compilations": 0, "seconds": 0.0}

    def listen(event: str, seconds: float, **_) -> None:
        if event == COMPILE_EVENT:
            counts["compilations"] += 1
            counts["seconds"] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def timed(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(warm-up seconds, median seconds of `repeats` more passes) of run()."""
    seconds = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return seconds[0], statistics.median(seconds[1:])


def time_modes(ranker, prompts: dict, chosen: list[int], repeats: int) -> dict[str, dict[str, tuple[float, float]]]:
    """mode -> task -> (warm-up seconds, timed seconds) of the ranker on the chosen users' prompts."""
    out = {}
    for mode in MODES:
        ranker.generate_mode = mode == "generate"
        out[mode] = {task: timed(lambda: ranker.score(task, [prompts[task][u] for u in chosen]), repeats)
                     for task in sorted(prompts)}
    return out


def token_bounds(ranker, prompts: dict, chosen: list[int]) -> dict[str, float]:
    from recranker_jax.rank.scorers import token_counts

    bounds = {}
    for task in ("pointwise", "pairwise"):
        if task in prompts:
            cached, full = token_counts(ranker.prompt_groups([prompts[task][u] for u in chosen]))
            bounds[f"{task}_prompt_token_ratio"] = full / cached
    return bounds


def task_records(prompts: dict, chosen: list[int]) -> dict[str, list[dict]]:
    """The records generate-and-parse answers per task (listwise: one per user)."""
    return {task: [r for u in chosen for r in (prompts[task][u][:1] if task == "listwise" else prompts[task][u])]
            for task in sorted(prompts)}


# ----------------------------------------------------------------------------- PyTorch generate

def torch_device(model) -> tuple[str | None, str]:
    """(the torch device holding the model's weights, cpu or cuda, or None where this torch
    cannot reach it; JAX's platform)."""
    import jax
    import torch
    from flax import nnx

    platform = jax.tree.leaves(nnx.state(model))[0].devices().pop().platform
    if platform == "cpu":
        return "cpu", platform
    return ("cuda" if platform in ("gpu", "cuda") and torch.cuda.is_available() else None), platform


def torch_llama(model, device: str):
    """transformers' LlamaForCausalLM holding the JAX model's own weights (DLPack views, no copy)."""
    import torch
    from flax import nnx
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from recranker_jax.llm.hf_export import hf_config
    from recranker_jax.llm.hf_import import hf_parameter_names

    config = LlamaConfig.from_dict(hf_config(model), attn_implementation="sdpa")
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    flat = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    shared: dict[tuple, torch.Tensor] = {}
    for name, (path, transpose) in hf_parameter_names(model.config).items():
        if path in flat:
            tensor = torch.from_dlpack(flat[path])
        else:  # scanned layers: one stacked array, a view per layer
            stacked = ("layers", *path[2:])
            if stacked not in shared:
                shared[stacked] = torch.from_dlpack(flat[stacked])
            tensor = shared[stacked][path[1]]
        module, _, leaf = name.rpartition(".")
        setattr(hf.get_submodule(module), leaf, torch.nn.Parameter(tensor.T if transpose else tensor, requires_grad=False))
    if config.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    with torch.device(device):
        hf.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    missing = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if missing:
        raise RuntimeError(f"no JAX weights for {', '.join(missing[:3])}")
    return hf.eval()


def torch_generate(hf, device: str, prompts: list[list[int]], tokens: int, eos: int | None, pad: int,
                   batch_size: int) -> list[list[int]]:
    """Greedy continuations by `hf.generate`, left-padded batches of `batch_size` shortest first;
    exactly `tokens` new tokens each when `eos` is None, else stopping at it."""
    import numpy as np
    import torch

    order = np.argsort([len(p) for p in prompts], kind="stable")
    outputs: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size].tolist()
        width = max(len(prompts[i]) for i in indices)
        ids = torch.full((len(indices), width), pad, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.inference_mode():
            out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                              max_new_tokens=tokens, min_new_tokens=tokens if eos is None else 0,
                              eos_token_id=eos, pad_token_id=pad)
        outputs.update(zip(indices, out[:, width:].tolist()))
    return [outputs[i] for i in range(len(prompts))]


def time_torch(ranker, device: str, records: dict[str, list[dict]], repeats: int) -> dict[str, float]:
    """task -> median seconds of transformers' generate on the ranker's model, after a warm-up
    on one batch of the task (no compilation to wait for, only first-call set-up)."""
    hf = torch_llama(ranker.model, device)
    tok, size = ranker.tokenizer, ranker.batch * 4
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = {}
    for task, recs in records.items():
        ids = [tok(r["prompt"])["input_ids"] for r in recs]
        torch_generate(hf, device, ids[:size], ranker.generate_tokens[task], ranker.eos, pad, size)
        out[task] = timed(lambda: torch_generate(hf, device, ids, ranker.generate_tokens[task], ranker.eos, pad, size),
                          repeats)[1]
    return out


def torch_side(ranker, records: dict[str, list[dict]], repeats: int) -> tuple[dict | None, str]:
    """(task seconds or None, what happened): an optional comparison never fails the benchmark."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as err:
        return None, f"skipped: {err.name} is not installed"
    device, platform = torch_device(ranker.model)
    if device is None:
        return None, f"skipped: torch {torch.__version__} cannot reach JAX's {platform} device"
    try:
        seconds = time_torch(ranker, device, records, repeats)
        return seconds, f"transformers LlamaForCausalLM.generate on {device}, sdpa, the JAX weights"
    except Exception as err:  # noqa: BLE001 (a failure here must not lose the JAX figures)
        return None, f"failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}"


# ----------------------------------------------------------------------------- the benchmark

def summary(prefix: str, seconds: dict[str, float], items: int) -> dict[str, float]:
    """Seconds per item overall and per task, and items per second."""
    total = sum(seconds.values())
    return {f"{prefix}_seconds_per_item": total / items, f"{prefix}_items_per_second": items / total,
            **{f"{prefix}_{task}_seconds_per_item": s / items for task, s in seconds.items()}}


def rank_results(timings: dict, torch_seconds: dict | None, items: int) -> dict[str, float]:
    """The result metrics of both modes' (warm-up, timed) seconds per task and PyTorch's seconds."""
    results = {}
    for mode, by_task in timings.items():
        results.update(summary(mode, {t: s for t, (_, s) in by_task.items()}, items))
        results[f"{mode}_compile_seconds"] = sum(w - s for w, s in by_task.values())
        results.update({f"{mode}_{t}_compile_seconds": w - s for t, (w, s) in by_task.items()})
    results["speedup"] = results["generate_seconds_per_item"] / results["scores_seconds_per_item"]
    for t in timings["scores"]:
        results[f"{t}_speedup"] = results[f"generate_{t}_seconds_per_item"] / results[f"scores_{t}_seconds_per_item"]
    if torch_seconds:
        results.update(summary("torch_generate", torch_seconds, items))
        results["torch_speedup"] = results["torch_generate_seconds_per_item"] / results["scores_seconds_per_item"]
    return results


def bench_rank(cfg: Config, users: int = 32, repeats: int = 1, preset: str = "run", layers: int | None = None,
               compare_torch: bool = True, profile: bool = False) -> dict:
    """Seconds per scored candidate on the run's stages (the preset's: `needed_stage`), reusing
    them when finished for this config, else building them in a temporary folder. `profile`: one
    more pass of each task's scorer after the timed ones, traced with `jax.profiler` into
    runs/<name>/bench/rank/profile/ (`instruments.bench_profile_dir`)."""
    from recranker_jax.instruments import bench_profile_dir
    from recranker_jax.pipeline import look

    check_arguments(users, repeats, preset, layers)
    trace_dir = bench_profile_dir(cfg, "rank").resolve() if profile else None
    with look(cfg, needed_stage(preset), note=True) as looked:  # a benchmark writes nothing into runs/
        return _bench_rank(looked, users, repeats, preset, layers, compare_torch, trace_dir)


def trace_scorers(ranker, prompts: dict, chosen: list[int], folder: Path) -> None:
    """One pass of each task's batched scorer under `jax.profiler.trace` into `folder`."""
    import jax

    ranker.generate_mode = False
    folder.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(folder)):
        for task in sorted(prompts):
            ranker.score(task, [prompts[task][u] for u in chosen])


def _bench_rank(cfg: Config, users: int, repeats: int, preset: str, layers: int | None, compare_torch: bool,
                trace_dir: Path | None = None) -> dict:
    from recranker_jax.hardware import environment
    from recranker_jax.data.split import load_split
    from recranker_jax.run import RunFolder, read_candidates
    from recranker_jax.rank.stage import read_prompts

    run = RunFolder.of(cfg)
    finetune_dir = run.finetune.path if preset == "run" else None
    data = load_split(run.data.path)
    candidates = read_candidates(run.retrieval.candidates("test"), data)
    prompts = read_prompts(run.instructions.prompts("test"), data, candidates)
    chosen = sorted(set.intersection(*(set(prompts[t]) for t in prompts)))[:users]
    items = sum(len(candidates[u]) for u in chosen)
    with counting_compilations() as compiled:
        ranker, model = build_ranker(cfg, preset, layers, data, finetune_dir)
        bounds = token_bounds(ranker, prompts, chosen)
        timings = time_modes(ranker, prompts, chosen, repeats)
    if trace_dir is not None:
        trace_scorers(ranker, prompts, chosen, trace_dir)
    torch_seconds, torch_note = (torch_side(ranker, task_records(prompts, chosen), repeats) if compare_torch
                                 else (None, "skipped: --no-torch"))
    results = rank_results(timings, torch_seconds, items)
    results.update(bounds, model_init_seconds=model["init_seconds"], compilations=compiled["compilations"],
                   xla_compile_seconds=compiled["seconds"])
    return {
        "environment": environment(),
        "settings": {"run": str(run.path), "preset": preset, "users": len(chosen), "items": items, "tasks": sorted(prompts),
                     "repeats": repeats, "batch_size": cfg.rank.batch_size, "generate_batch_size": ranker.batch * 4,
                     "generate_tokens": {t: ranker.generate_tokens[t] for t in sorted(prompts)},
                     "generate_stops_at_eos": ranker.eos is not None, "dtype": model["dtype"], "model": model,
                     "torch": torch_note},
        "results": {"rank": results},
    }


def format_results(doc: dict) -> str:
    r, s = doc["results"]["rank"], doc["settings"]
    m = s["model"]
    torch = "torch_generate_seconds_per_item" in r
    lengths = ", ".join(f"{t} {n}" for t, n in s["generate_tokens"].items())
    rows = [f"{s['users']} users, {s['items']} candidates; per task, median of {s['repeats']} after a warm-up",
            f"model: {m['preset']}, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, vocabulary "
            f"{m['vocab_size']}, {m['parameters'] / 1e6:,.1f}M parameters, {m['param_dtype']} weights, {m['dtype']} "
            f"compute; built or loaded in {m['init_seconds']:.1f} s",
            f"generated answers: {lengths} tokens ({'at most; stops at EOS' if s['generate_stops_at_eos'] else 'exactly'})",
            f"{'seconds per candidate':<24}{'scores':>10}{'generate':>10}{'ratio':>8}{'token ratio':>13}"
            + (f"{'torch gen':>11}{'ratio':>8}" if torch else "") + f"{'compile s (scores, generate)':>30}"]
    for task in [*s["tasks"], None]:
        key = f"{task}_seconds_per_item" if task else "seconds_per_item"
        scored, generated = r[f"scores_{key}"], r[f"generate_{key}"]
        bound = r.get(f"{task}_prompt_token_ratio")
        compile_key = f"{task}_compile_seconds" if task else "compile_seconds"
        row = (f"{task or 'all tasks':<24}{scored:>10.5f}{generated:>10.5f}{generated / scored:>7.1f}x"
               + (f"{bound:>12.1f}x" if bound else f"{'':>13}"))
        if torch:
            row += f"{r[f'torch_generate_{key}']:>11.5f}{r[f'torch_generate_{key}'] / scored:>7.1f}x"
        rows.append(row + f"{r[f'scores_{compile_key}']:>17.1f}, {r[f'generate_{compile_key}']:.1f}")
    rows.append(f"generate / scores: x{r['speedup']:.1f} seconds per item (items/s: scores "
                f"{r['scores_items_per_second']:.1f}, generate {r['generate_items_per_second']:.1f}); "
                f"{r['compilations']} XLA compilations, {r['xla_compile_seconds']:.1f} s")
    rows.append(f"torch: {s['torch']}")
    rows.append("token ratio: prompt tokens run by one full prompt per question (generate) over one cached prefix "
                "per user plus each question's suffix (scores); prefix caching alone cannot save more")
    rows.append("compile s: a task's warm-up pass minus its timed pass")
    return "\n".join(rows)
