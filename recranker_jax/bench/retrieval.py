"""`recranker bench retrieval`: one training epoch and one full-ranking pass of a retrieval model,
timed for this JAX implementation and for a plain PyTorch one on the same split, batches and
hyper-parameters. `--model lightgcn` (the default): JAX dense and edge-list propagation vs
torch.sparse.mm (bench/torch_lightgcn.py); `--model sasrec`: the jitted `lax.scan` epoch of
`fit_sasrec` vs an eager PyTorch SASRec of the same architecture (bench/torch_sasrec.py).

Each variant runs in its own process so that its peak resident memory is its own.
Times are medians over repeats after one warm-up (compilation) run.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from recranker_jax.config import Config, ExplicitMFConfig, RetrievalConfig, SequenceConfig
from recranker_jax.errors import RecRankerError
from recranker_jax.run import DataFolder, read_json

VARIANTS = ("jax-dense", "jax-edges", "torch-sparse")  # --model lightgcn
SASREC_VARIANTS = ("jax-sasrec", "torch-sasrec")  # --model sasrec
MODEL_VARIANTS = {"lightgcn": VARIANTS, "sasrec": SASREC_VARIANTS}
TORCH_BASELINE = {"lightgcn": "torch-sparse", "sasrec": "torch-sasrec"}
RANK_K = 20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure_jax(data_dir: Path, cfg: RetrievalConfig, backend: str, repeats: int, seed: int) -> dict:
    import jax
    import optax
    from flax import nnx

    from recranker_jax.data.split import load_split
    from recranker_jax.retrieval.evaluate import exclusions, top_k
    from recranker_jax.retrieval.train import bpr_problem, make_epoch_fn

    data = load_split(data_dir)
    problem = bpr_problem(data, dataclasses.replace(cfg, propagation=backend), cfg.layers, seed)
    tx = optax.adam(cfg.lr)
    graphdef, params = nnx.split(problem.model, nnx.Param)
    run_epoch = make_epoch_fn(graphdef, problem.loss, tx)
    state = {"params": params, "opt": tx.init(params), "epoch": 0}

    def epoch() -> None:
        batches = problem.epoch_batches(state["epoch"])  # host-side sampling counts as epoch time
        state["params"], state["opt"], loss = run_epoch(state["params"], state["opt"], batches)
        jax.block_until_ready(loss)
        state["epoch"] += 1

    exclude = exclusions(data, "valid")

    def rank() -> None:
        top_k(problem.scorer_of(nnx.merge(graphdef, state["params"])), exclude, RANK_K, cfg.eval_batch_users)

    return {"epoch_seconds": _timed(epoch, repeats), "rank_seconds": _timed(rank, repeats),
            "steps_per_epoch": int(problem.epoch_batches(0)["user"].shape[0]), "backend": problem.graph.backend}


def measure_torch(data_dir: Path, cfg: RetrievalConfig, repeats: int, seed: int) -> dict:
    torch = _torch_or_error()
    from recranker_jax.bench.torch_lightgcn import TorchLightGCN, full_ranking, train_epoch
    from recranker_jax.data.split import load_split
    from recranker_jax.retrieval.evaluate import exclusions
    from recranker_jax.retrieval.train import bpr_problem, liked_pairs

    data = load_split(data_dir)
    users, items = liked_pairs(data)
    model = TorchLightGCN(data.n_users, data.n_items, cfg.dim, cfg.layers, users, items, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # The JAX problem's batch builder, so both see the same shuffles and negatives.
    problem = bpr_problem(data, dataclasses.replace(cfg, propagation="edges"), cfg.layers, seed)
    counter = {"epoch": 0}

    def epoch() -> None:
        train_epoch(model, optimizer, problem.epoch_batches(counter["epoch"]), cfg.l2)
        counter["epoch"] += 1

    exclude = exclusions(data, "valid")
    return {"epoch_seconds": _timed(epoch, repeats), "rank_seconds": _timed(lambda: full_ranking(model, exclude, RANK_K), repeats),
            "torch_threads": torch.get_num_threads()}


def _torch_or_error():
    try:
        import torch
    except ImportError:
        raise RecRankerError("bench retrieval compares against PyTorch: pip install torch==2.13.0 (or the test extra)") from None
    return torch


def sasrec_settings(cfg: RetrievalConfig):
    """The SASRec settings of a run config's retrieval section."""
    from recranker_jax.retrieval.sasrec import SASRecSettings

    return SASRecSettings.of(cfg)


def measure_jax_sasrec(data_dir: Path, cfg: RetrievalConfig, repeats: int, seed: int) -> dict:
    """`fit_sasrec`'s epoch: host-side batches (shuffle, negatives, dropout keys) + the jitted scan."""
    import jax
    import optax
    from flax import nnx

    from recranker_jax.data.split import load_split
    from recranker_jax.retrieval.evaluate import exclusions, top_k
    from recranker_jax.retrieval.sasrec import sasrec_problem, sasrec_scorer, scoring_sequences
    from recranker_jax.retrieval.train import make_epoch_fn

    data = load_split(data_dir)
    settings = sasrec_settings(cfg)
    problem = sasrec_problem(data, settings, seed)
    tx = optax.adam(settings.lr)
    graphdef, params = nnx.split(problem.model, nnx.Param)
    run_epoch = make_epoch_fn(graphdef, problem.loss, tx)
    state = {"params": params, "opt": tx.init(params), "epoch": 0}

    def epoch() -> None:
        batches = problem.shard_batches(problem.epoch_batches(state["epoch"]))
        state["params"], state["opt"], loss = run_epoch(state["params"], state["opt"], batches)
        jax.block_until_ready(loss)
        state["epoch"] += 1

    sequences = scoring_sequences(data, "valid", settings.max_len)
    exclude = exclusions(data, "valid")

    def rank() -> None:
        scorer = sasrec_scorer(nnx.merge(graphdef, state["params"]), sequences, settings.eval_batch_users)
        top_k(scorer, exclude, RANK_K, settings.eval_batch_users)

    return {"epoch_seconds": _timed(epoch, repeats), "rank_seconds": _timed(rank, repeats),
            "steps_per_epoch": int(problem.epoch_batches(0)["inputs"].shape[0]), "loss": settings.loss}


def measure_torch_sasrec(data_dir: Path, cfg: RetrievalConfig, repeats: int, seed: int) -> dict:
    """The PyTorch SASRec's eager epoch on the JAX problem's batches (built inside the timed epoch too)."""
    torch = _torch_or_error()
    from recranker_jax.bench.torch_sasrec import TorchSASRec, full_ranking, train_epoch
    from recranker_jax.data.split import load_split
    from recranker_jax.retrieval.evaluate import exclusions
    from recranker_jax.retrieval.sasrec import sasrec_problem, scoring_sequences

    data = load_split(data_dir)
    settings = sasrec_settings(cfg)
    model = TorchSASRec(data.n_items, settings.max_len, settings.dim, settings.blocks, settings.heads, settings.dropout, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    problem = sasrec_problem(data, settings, seed)  # its batch builder: the same shuffles and negatives
    counter = {"epoch": 0}

    def epoch() -> None:
        train_epoch(model, optimizer, problem.epoch_batches(counter["epoch"]), settings.loss, settings.l2)
        counter["epoch"] += 1

    sequences = scoring_sequences(data, "valid", settings.max_len)
    exclude = exclusions(data, "valid")
    return {"epoch_seconds": _timed(epoch, repeats),
            "rank_seconds": _timed(lambda: full_ranking(model, sequences, exclude, RANK_K, settings.eval_batch_users), repeats),
            "steps_per_epoch": int(problem.epoch_batches(0)["inputs"].shape[0]), "loss": settings.loss,
            "torch_threads": torch.get_num_threads()}


def _retrieval_config(cfg_json: str) -> RetrievalConfig:
    fields = json.loads(cfg_json)
    return RetrievalConfig(**{**fields, "explicit_mf": ExplicitMFConfig(**fields["explicit_mf"]),
                              "sequence": SequenceConfig(**fields["sequence"])})


def _variant_main(argv: list[str]) -> None:
    variant, data_dir, cfg_json, repeats, seed = argv
    cfg = _retrieval_config(cfg_json)
    if variant == "jax-sasrec":
        result = measure_jax_sasrec(Path(data_dir), cfg, int(repeats), int(seed))
    elif variant == "torch-sasrec":
        result = measure_torch_sasrec(Path(data_dir), cfg, int(repeats), int(seed))
    elif variant == "torch-sparse":
        result = measure_torch(Path(data_dir), cfg, int(repeats), int(seed))
    else:
        result = measure_jax(Path(data_dir), cfg, variant.removeprefix("jax-"), int(repeats), int(seed))
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print("RESULT " + json.dumps(result))


def bench_retrieval(cfg: Config, repeats: int = 3, variants: tuple[str, ...] | None = None, model: str = "lightgcn") -> dict:
    """Run every variant of `model` (default: all of them) in a subprocess on the config's split;
    returns the results document."""
    from recranker_jax.pipeline import look
    from recranker_jax.run import RunFolder

    if model not in MODEL_VARIANTS:
        raise RecRankerError(f"bench retrieval: unknown model {model!r}; expected one of {', '.join(MODEL_VARIANTS)}")
    variants = MODEL_VARIANTS[model] if variants is None else variants

    cfg_json = json.dumps(dataclasses.asdict(cfg.retrieval))
    results = {}
    with look(cfg, "data", note=True) as looked:  # a benchmark writes nothing into runs/
        data_dir = RunFolder.of(looked).data.path
        meta = read_json(DataFolder(data_dir).meta)
        for variant in variants:
            command = [sys.executable, "-m", "recranker_jax.bench.retrieval", variant, str(data_dir), cfg_json,
                       str(repeats), str(cfg.run.seed)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise RecRankerError(f"bench retrieval: variant {variant} failed: {last}")
            results[variant] = json.loads(lines[-1].removeprefix("RESULT "))
    from recranker_jax.hardware import environment

    problem = {"model": model, "source": meta["source"], "users": meta["users_kept"], "items": meta["items"],
               "train_likes": meta["train_likes"], "rank_k": RANK_K}
    if model == "sasrec":
        problem.update({k: v for k, v in dataclasses.asdict(cfg.retrieval.sequence).items()
                        if k not in ("epochs", "eval_every", "patience")})
    else:
        problem.update(dim=cfg.retrieval.dim, layers=cfg.retrieval.layers, batch_size=cfg.retrieval.batch_size)
    return {
        "benchmark": "retrieval",
        "problem": problem,
        "environment": environment(),  # the schema `recranker bench compare` reads
        "repeats": repeats,
        "results": results,
    }


def format_results(doc: dict) -> str:
    results = doc["results"]
    rows = [f"{'variant':<14}{'epoch s':>10}{'rank s':>10}{'peak MB':>10}"]
    for name, r in results.items():
        rows.append(f"{name:<14}{r['epoch_seconds']:>10.3f}{r['rank_seconds']:>10.3f}{r['peak_rss_mb']:>10.0f}")
    baseline = TORCH_BASELINE[doc["problem"].get("model", "lightgcn")]
    if baseline in results:
        for name in results:
            if name.startswith("jax-"):
                epoch_ratio = results[name]["epoch_seconds"] / results[baseline]["epoch_seconds"]
                rank_ratio = results[name]["rank_seconds"] / results[baseline]["rank_seconds"]
                rows.append(f"{name} / {baseline}: epoch time x{epoch_ratio:.2f}, ranking time x{rank_ratio:.2f}")
    return "\n".join(rows)


if __name__ == "__main__":
    _variant_main(sys.argv[1:])
