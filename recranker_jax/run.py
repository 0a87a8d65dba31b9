"""The run folder, runs/<name>/, as one typed layout: every path in it, and the readers and
writers of the files one stage hands to the next. The file formats are the public contract
(outside tools read them); the stages, the report, the CLI and the benchmarks use only this.

    runs/<name>/config.yaml  data/  retrieval/  instructions/  pretrain/  finetune/  ranking/
                checkpoints/<stage>-<key>/  metrics.json  report.md  plots/

A training stage's folder may also hold tensorboard/ and profile/ (instruments.py), which no
manifest lists (`INSTRUMENT_FOLDERS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recranker_jax.errors import RecRankerError

SPLITS = ("test", "valid")  # the held-out items a run ranks and evaluates
SPLIT_FILES = ("train.csv", "valid.csv", "test.csv", "items.csv")
MARKER = "_stage.json"  # in a stage folder: it finished, with this cache key, config and file manifest
WHOLE_HASH_BYTES = 64 * 2**20
# Folders of a stage folder that hold instruments, not results (TensorBoard event files, profiler
# traces; instruments.py): they differ at every run, so no manifest lists them and no check reads them.
INSTRUMENT_FOLDERS = ("tensorboard", "profile")  # larger files are fingerprinted by size and their first and last MiB


def _checked(split: str) -> str:
    if split not in SPLITS:
        raise RecRankerError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


def _split_file(stem: str, split: str, suffix: str) -> str:
    """test: `stem.suffix`; another split: `stem_<split>.suffix` (candidates.csv, rankings_valid.csv)."""
    return f"{stem}.{suffix}" if _checked(split) == "test" else f"{stem}_{split}.{suffix}"


@dataclasses.dataclass(frozen=True)
class DataFolder:
    """data/: the leave-one-out split (raw ids) and its statistics."""

    path: Path

    def csv(self, name: str) -> Path:
        """train.csv, valid.csv, test.csv or items.csv."""
        return self.path / f"{name}.csv"

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"


@dataclasses.dataclass(frozen=True)
class RetrievalFolder:
    """retrieval/: every backbone's metrics, parameters and factors, the backbone's candidates."""

    path: Path

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def history(self) -> Path:
        return self.path / "history.json"

    def candidates(self, split: str) -> Path:
        return self.path / _split_file("candidates", split, "csv")

    def planted(self, split: str) -> Path:
        """The planted evaluation's candidates (`rank.candidates=planted`): the backbone's top
        k-1 other items plus the split's held-out item, in backbone score order."""
        return self.path / _split_file("candidates_planted", split, "csv")

    def sampled(self, split: str) -> Path:
        """The sampled evaluation's candidates (`rank.candidates=sampled`): the split's held-out
        item plus k-1 items the user never rated, drawn uniformly, in backbone score order."""
        return self.path / _split_file("candidates_sampled", split, "csv")

    def candidate_set(self, kind: str, split: str) -> Path:
        """The candidates `rank.candidates=kind` re-ranks: retrieved, planted or sampled."""
        return {"retrieved": self.candidates, "planted": self.planted, "sampled": self.sampled}[kind](split)

    def model(self, name: str) -> Path:
        """A model's folder: params/ (Orbax) and, for ranking models, embeddings.npz."""
        return self.path / name

    def embeddings(self, name: str) -> Path:
        return self.model(name) / "embeddings.npz"

    @property
    def explicit_mf(self) -> Path:
        return self.path / "explicit_mf.npz"


@dataclasses.dataclass(frozen=True)
class InstructionsFolder:
    """instructions/: training examples, inference prompts per split, the tokenizer, statistics."""

    path: Path

    @property
    def train(self) -> Path:
        return self.path / "train.jsonl"

    def prompts(self, split: str) -> Path:
        return self.path / f"{_checked(split)}.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def stats(self) -> Path:
        return self.path / "stats.json"


@dataclasses.dataclass(frozen=True)
class PretrainFolder:
    """pretrain/: the domain-pre-trained model (a Hugging Face folder) and its training log;
    only summary.json when pre-training is off."""

    path: Path

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"


@dataclasses.dataclass(frozen=True)
class FinetuneFolder:
    """finetune/: the tuned model (a Hugging Face folder), the PEFT adapter, the training log."""

    path: Path

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"


@dataclasses.dataclass(frozen=True)
class RankingFolder:
    """ranking/: metrics, every method's order per split, the scorers' raw outputs."""

    path: Path

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    def rankings(self, split: str) -> Path:
        return self.path / _split_file("rankings", split, "csv")

    def scores(self, split: str) -> Path:
        return self.path / f"scores_{_checked(split)}.npz"


# Each stage's folder under runs/<name>/ (the rank stage's is "ranking").
STAGE_FOLDERS = {"data": "data", "retrieval": "retrieval", "instructions": "instructions", "pretrain": "pretrain",
                 "finetune": "finetune", "rank": "ranking"}


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """runs/<name>/ of one run."""

    path: Path

    @classmethod
    def of(cls, cfg: Any) -> RunFolder:
        """The run folder of a config (`run.root` / `run.name`)."""
        return cls(Path(cfg.run.root) / cfg.run.name)

    def stage(self, name: str) -> Path:
        return self.path / STAGE_FOLDERS[name]

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def data(self) -> DataFolder:
        return DataFolder(self.stage("data"))

    @property
    def retrieval(self) -> RetrievalFolder:
        return RetrievalFolder(self.stage("retrieval"))

    @property
    def instructions(self) -> InstructionsFolder:
        return InstructionsFolder(self.stage("instructions"))

    @property
    def pretrain(self) -> PretrainFolder:
        return PretrainFolder(self.stage("pretrain"))

    @property
    def finetune(self) -> FinetuneFolder:
        return FinetuneFolder(self.stage("finetune"))

    @property
    def ranking(self) -> RankingFolder:
        return RankingFolder(self.stage("rank"))

    def checkpoints(self, stage: str, key: str) -> Path:
        """Training state of an unfinished stage, kept across interruptions."""
        return self.path / "checkpoints" / f"{stage}-{key}"

    @property
    def metrics(self) -> Path:
        """The report's copy of ranking/metrics.json."""
        return self.path / "metrics.json"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def plots(self) -> Path:
        return self.path / "plots"


# ----------------------------------------------------------------------------- readers and writers

def write_json(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


def read_json(path: Path, missing: str = "run the stage that writes it first") -> Any:
    if not path.is_file():
        raise RecRankerError(f"{path} not found: {missing}")
    return json.loads(path.read_text())


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: Path, missing: str = "run `recranker instructions` first") -> list[dict]:
    if not path.is_file():
        raise RecRankerError(f"{path} not found: {missing}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_candidates(path: Path, data: Any, items: np.ndarray, scores: np.ndarray) -> None:
    """candidates.csv: user_id, rank (1-based), item_id, score; items / scores [users, k] in
    the split's user order (`SplitData`)."""
    k = items.shape[1]
    pd.DataFrame({
        "user_id": np.repeat(data.user_ids, k),
        "rank": np.tile(np.arange(1, k + 1), data.n_users),
        "item_id": data.items["item_id"].to_numpy()[items.ravel()],
        "score": [f"{s:.6g}" for s in scores.ravel()],
    }).to_csv(path, index=False, lineterminator="\n")


def read_candidates(path: Path, data: Any) -> list[list[int]]:
    """Per user (SplitData order), the candidate item indices in retrieval order."""
    if not path.is_file():
        raise RecRankerError(f"{path} not found: run `recranker retrieval` first (a retrieval stage finished by an "
                             "older version may lack this file: remove its folder to rebuild it)")
    frame = pd.read_csv(path, dtype={"user_id": str, "item_id": str})
    users = pd.Index(data.user_ids.astype(str)).get_indexer(frame["user_id"])
    items = pd.Index(data.items["item_id"].astype(str)).get_indexer(frame["item_id"])
    if (users < 0).any() or (items < 0).any():
        raise RecRankerError(f"{path}: user or item ids that are not in this run's split (a file from another run?)")
    frame = frame.assign(user=users, item=items).sort_values(["user", "rank"], kind="stable")
    lists: list[list[int]] = [[] for _ in range(data.n_users)]
    for user, group in frame.groupby("user"):
        lists[int(user)] = group["item"].tolist()
    return lists


def write_embeddings(path: Path, users: np.ndarray, items: np.ndarray) -> None:
    """A ranking model's factors: score(user, item) = items[item] @ users[user]."""
    np.savez(path, users=users, items=items)


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(user factors, item factors) written by `write_embeddings`."""
    if not path.is_file():
        raise RecRankerError(f"{path} not found: run `recranker retrieval` first")
    embeddings = np.load(path)
    return embeddings["users"], embeddings["items"]


EXPLICIT_MF_ARRAYS = ("user_factors", "item_factors", "user_bias", "item_bias", "mean_rating")


def write_explicit_mf(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """The rating model's arrays (`EXPLICIT_MF_ARRAYS`)."""
    np.savez(path, **{name: arrays[name] for name in EXPLICIT_MF_ARRAYS})


def read_explicit_mf(path: Path) -> dict[str, np.ndarray] | None:
    """The rating model's arrays, or None when the run trained none (no pointwise hints)."""
    return dict(np.load(path)) if path.is_file() else None


# ----------------------------------------------------------------------------- the stage marker

def file_digest(path: Path) -> str:
    """sha256 of the file, or, above `WHOLE_HASH_BYTES`, of its size and first and last MiB
    ("partial:" prefix): cheap enough to check a 7B model on every reuse, and a truncated or
    rewritten file still shows."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= WHOLE_HASH_BYTES:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
            return digest.hexdigest()
        digest.update(str(size).encode())
        digest.update(handle.read(2**20))
        handle.seek(size - 2**20)
        digest.update(handle.read(2**20))
    return "partial:" + digest.hexdigest()


def stage_files(folder: Path) -> list[Path]:
    """The files of a stage folder a manifest lists: all but its marker and `INSTRUMENT_FOLDERS`."""
    return [path for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != MARKER and path.relative_to(folder).parts[0] not in INSTRUMENT_FOLDERS]


def manifest(folder: Path) -> dict[str, list]:
    """Every file under a stage folder but its marker and instruments: relative path -> [size, digest]."""
    return {str(path.relative_to(folder)): [path.stat().st_size, file_digest(path)] for path in stage_files(folder)}


def write_marker(folder: Path, key: str, seconds: float, version: str, config: dict, inputs: dict[str, str]) -> None:
    """The marker of a finished stage: its key, build time, the config that built it, the
    digests of the upstream stages it read (`inputs`) and the manifest of its files."""
    write_json(folder / MARKER, {"key": key, "seconds": round(seconds, 3), "version": version, "inputs": inputs,
                                 "files": manifest(folder), "config": config})


def read_marker(folder: Path) -> dict | None:
    """A stage folder's marker, or None when the stage has not finished (or the marker is unreadable)."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def marker_digest(marker: dict) -> str:
    """One digest of a finished stage's files (what a downstream stage records as its input)."""
    return hashlib.sha256(json.dumps(marker.get("files", {}), sort_keys=True).encode()).hexdigest()[:16]


def damage(folder: Path, marker: dict) -> str | None:
    """The first difference between a finished stage's files and its manifest, or None."""
    recorded = marker.get("files")
    if recorded is None:
        return None  # finished by a version that kept no manifest
    present = {str(p.relative_to(folder)) for p in stage_files(folder)}
    for name in sorted(set(recorded) | present):
        path = folder / name
        if name not in present:
            return f"{path} is missing"
        if name not in recorded:
            return f"{path} was added after the stage finished"
        size, digest = recorded[name]
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} when the stage finished"
        if file_digest(path) != digest:
            return f"{path} changed after the stage finished"
    return None
