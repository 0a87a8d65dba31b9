"""`recranker bench compile`: the training step of a `bench train` preset lowered and compiled
ahead of time from abstract shapes (nothing allocated, no weights read), on this machine's
backend: the size of the lowered program, the seconds to lower and to compile it, and the
compiler's memory analysis. It shows what scanning the layers does to compile time (the
looped program grows with depth, the scanned one does not) and checks a step's memory before a
run, as MaxText's ahead-of-time compilation does.
"""

from __future__ import annotations

import time

from recranker_jax.config import Config
from recranker_jax.errors import RecRankerError


def step_shape(problem: dict, scan_layers: bool):
    """The `train.aot.StepShape` of a bench train problem, in the finetune's batch form."""
    from recranker_jax.bench.train import _llama_config, loss_mask
    from recranker_jax.train.aot import StepShape
    from recranker_jax.train.packing import answer_capacity

    lora = problem["lora"]
    return StepShape(
        llama=_llama_config(problem), batch_size=problem["batch_size"], seq_len=problem["seq_len"],
        dtype=problem["dtype"], param_dtype=problem["param_dtype"], remat=problem["remat"],
        attention=problem.get("attention", "auto"), scan_layers=scan_layers,
        lora=(tuple(lora["targets"]), lora["rank"], lora["alpha"]) if lora else None,
        answers=answer_capacity(loss_mask(problem)) if problem.get("loss") == "answers" else None,
        lr=problem["lr"], warmup_steps=problem["warmup_steps"], total_steps=problem["total_steps"],
        weight_decay=problem.get("weight_decay", 0.0), clip_norm=problem.get("clip_norm", 1.0))


def bench_compile(cfg: Config, preset: str = "7b-lora", scan_layers: bool = True, layers: int | None = None,
                  remat: str | None = None) -> dict:
    from recranker_jax.hardware import environment
    from recranker_jax.bench.train import problem_from_config
    from recranker_jax.llm.remat import resolve
    from recranker_jax.train.aot import abstract_step_inputs
    from recranker_jax.train.step import jitted_train_step

    problem = problem_from_config(cfg, preset, command="bench compile")
    if layers is not None:
        if layers < 1:
            raise RecRankerError(f"bench compile: --layers {layers}: expected a positive integer")
        problem["num_hidden_layers"] = layers
    problem["remat"] = resolve(remat or problem["remat"])
    model, optimizer, batch = abstract_step_inputs(step_shape(problem, scan_layers))
    started = time.perf_counter()
    lowered = jitted_train_step().lower(model, optimizer, batch)
    lower_seconds = time.perf_counter() - started
    program = lowered.as_text()
    started = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    memory_mb = {name: round(getattr(memory, f"{name}_size_in_bytes") / 2**20, 1)
                 for name in ("argument", "output", "temp", "generated_code")
                 if memory is not None and hasattr(memory, f"{name}_size_in_bytes")}
    return {
        "benchmark": "compile",
        "environment": environment(),
        "settings": {"preset": preset, "problem": problem, "scan_layers": scan_layers},
        "results": {"compile": {"program_characters": len(program), "lower_seconds": lower_seconds,
                                "compile_seconds": compile_seconds,
                                **{f"{name}_mb": value for name, value in memory_mb.items()}}},
    }


def format_results(doc: dict) -> str:
    r, s = doc["results"]["compile"], doc["settings"]
    p = s["problem"]
    rows = [f"compile/{s['preset']}: {p['num_hidden_layers']} layers {'scanned' if s['scan_layers'] else 'looped'}, "
            f"{p['batch_size']} x {p['seq_len']} tokens, {p['dtype']}, remat {p['remat']}"
            f"{', LoRA' if p['lora'] else ''}; on {doc['environment']['device_kind']}",
            f"lowered program: {r['program_characters']:,} characters in {r['lower_seconds']:.1f} s; "
            f"compiled in {r['compile_seconds']:.1f} s"]
    memory = [f"{name} {r[f'{name}_mb']:,.0f} MB" for name in ("argument", "output", "temp", "generated_code")
              if f"{name}_mb" in r]
    if memory:
        rows.append("memory: " + ", ".join(memory))
    return "\n".join(rows)
