"""Typed configuration: dataclasses loaded from YAML with dotted `key=value` overrides.

Every stage reads its own section (`cfg.data`, `cfg.mesh`, ...). Loading is
strict: an unknown key or a value of the wrong type is a `RecRankerError`
naming the dotted key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from recranker_jax.errors import RecRankerError


@dataclasses.dataclass
class RunConfig:
    """Where a run lives: runs/<name>/ under `root`; `seed` seeds every random choice (0 to
    2**32 - 1, the range every generator here accepts).

    rebuild: a finished stage whose config changed is replaced (false: the command stops
      before any work and says which settings differ); `--rebuild` on the command line sets
      it. It says what one command may do, not how the run was made: never recorded in the
      run's config.yaml.
    compilation_cache: JAX's persistent compilation cache in `root`/.jax_cache, so a resumed
      or repeated run reuses its compiled training steps (auto: on accelerators only; an
      execution setting, in no stage's cache key).
    tensorboard: every training stage (retrieval, pretrain, finetune) writes TensorBoard event
      files into its folder's tensorboard/ (instruments.py); an execution setting.
    """

    name: str = "quickstart"
    root: str = "runs"
    seed: int = 0
    rebuild: bool = False
    compilation_cache: Literal["auto", "always", "never"] = "auto"
    tensorboard: bool = True


# Settings of one command, not of the run: left out of the recorded config (`recorded_config`).
COMMAND_SETTINGS = {"run": ("rebuild",)}


@dataclasses.dataclass
class DataConfig:
    """Which ratings to load and how to turn them into the RecRanker split.

    source: movielens-small | ml-100k | ml-1m | bookcrossing | tfds:<name>.
    path: folder or zip with the source's files (not needed for movielens-small).
    like_threshold / dislike_threshold: rating >= like is a like, <= dislike a
      dislike; null takes the source's default (4 / 2 on 1-5, 8 / 4 on 1-10).
    min_likes: users with fewer likes are dropped (test + validation + >= 1 train).
    on_bad_lines: error (stop at the first malformed line) or skip (count them).
    """

    source: str = "movielens-small"
    path: str | None = None
    like_threshold: float | None = None
    dislike_threshold: float | None = None
    min_likes: int = 4
    on_bad_lines: Literal["error", "skip"] = "error"


def _default_rules() -> dict[str, list[str]]:
    return {
        "batch": ["data", "fsdp"],
        "embed": ["fsdp"],
        "mlp": ["tensor"],
        "heads": ["tensor"],
        "kv_heads": ["tensor"],
        "vocab": ["tensor"],
        "users": ["data", "fsdp"],
        "items": ["data", "fsdp"],
    }


@dataclasses.dataclass
class MeshConfig:
    """Device mesh: `shape` over `axes` (one entry may be -1: the remaining devices).

    rules maps each logical axis name used by model code to the mesh axes it is
    sharded over; an empty list (or a missing name) means replicated.
    """

    shape: list[int] = dataclasses.field(default_factory=lambda: [-1, 1, 1])
    axes: list[str] = dataclasses.field(default_factory=lambda: ["data", "fsdp", "tensor"])
    rules: dict[str, list[str]] = dataclasses.field(default_factory=_default_rules)


@dataclasses.dataclass
class ExplicitMFConfig:
    """The rating-predicting MF behind the pointwise hint (trained on training ratings only)."""

    dim: int = 32
    lr: float = 5e-3
    l2: float = 0.05
    batch_size: int = 4096
    epochs: int = 100
    eval_every: int = 2
    patience: int = 5


@dataclasses.dataclass
class SequenceConfig:
    """SASRec (`retrieval.models` entry `sasrec`; retrieval/sasrec.py): the last `max_len`
    training likes in time order, `blocks` causal self-attention blocks of `heads` heads,
    full-softmax cross-entropy (`ce`) or BCE with one sampled negative (`bce`, the paper's),
    early stopping on validation NDCG@10 like the other models."""

    max_len: int = 50
    dim: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 200
    eval_every: int = 5
    patience: int = 10  # 5 stopped one of 3 seeds at epoch 35 on the embedded MovieLens's noisy validation NDCG
    loss: Literal["ce", "bce"] = "ce"
    l2: float = 0.0


@dataclasses.dataclass
class RetrievalConfig:
    """The conventional recommenders (RecRanker's backbones) and their candidates.

    models: any of lightgcn, mf (BPR-MF = LightGCN with 0 layers), explicit_mf, popularity, sasrec
      (its settings: `sequence`), or a model added with `retrieval.backbones.register_backbone`.
    backbone: the model whose top-`candidates` items the LLM re-ranks.
    propagation: dense | edges | auto (dense while the user x item matrix is small).
    eval_every / patience: validate NDCG@10 every N epochs; stop after `patience`
      validations without improvement; the best epoch's parameters are kept.
    """

    models: list[str] = dataclasses.field(default_factory=lambda: ["lightgcn", "mf", "explicit_mf", "popularity"])
    backbone: str = "lightgcn"
    candidates: int = 10
    dim: int = 64
    layers: int = 2
    lr: float = 1e-3
    l2: float = 1e-4
    batch_size: int = 2048
    epochs: int = 400
    eval_every: int = 10
    patience: int = 5
    propagation: Literal["auto", "dense", "edges"] = "auto"
    eval_batch_users: int = 1024
    explicit_mf: ExplicitMFConfig = dataclasses.field(default_factory=ExplicitMFConfig)
    sequence: SequenceConfig = dataclasses.field(default_factory=SequenceConfig)


@dataclasses.dataclass
class SamplingConfig:
    """Which users the training instructions are drawn for (RecRanker's adaptive user sampling).

    strategy: uniform | importance | cluster | adaptive (importance + cluster pooled,
      then redrawn with the repetition penalty). size: entries drawn (with
      replacement); fraction: share of `size` each of importance and cluster draws
      before pooling; clusters: k-means clusters on the backbone's user embeddings;
      penalty: an entry whose user occurs c times in the pool weighs penalty^(c-1).
    """

    strategy: Literal["uniform", "importance", "cluster", "adaptive"] = "adaptive"
    size: int = 5000
    fraction: float = 0.6
    clusters: int = 10
    penalty: float = 0.95


@dataclasses.dataclass
class TemplatesConfig:
    """Prompt templates (str.format). Every task's instruction and question must keep its
    placeholders: {noun}, {max_rating} (pointwise), {history}, {target} / {first}, {second} /
    {candidates}, and {hint} where hints are on. A missing placeholder is a config error."""

    pointwise_instruction: str = (
        "You are a {noun} recommender system. Given the user's ratings of {noun}s on a scale from 1 to "
        "{max_rating}, predict the user's rating of a target {noun}.\nThe user's rated {noun}s:\n{history}\n"
    )
    pointwise_question: str = 'Target {noun}: {target}\n{hint}What rating from 1 to {max_rating} would the user give? Answer:'
    pointwise_hint: str = "Hint: another recommender system predicts a rating of {rating}.\n"
    pairwise_instruction: str = (
        "You are a {noun} recommender system. Given the {noun}s the user liked and disliked, determine "
        "whether the user would prefer one {noun} over another. Answer Yes or No.\n"
        "Liked {noun}s:\n{history}\nDisliked {noun}s:\n{disliked}\n"
    )
    pairwise_question: str = "{hint}Would the user prefer {first} over {second}? Answer:"
    pairwise_hint: str = "Hint: another recommender system prefers {preferred}.\n"
    listwise_instruction: str = (
        "You are a {noun} recommender system. Given the {noun}s the user liked and disliked, rank the "
        "candidate {noun}s and return the top five, best first.\n"
        "Liked {noun}s:\n{history}\nDisliked {noun}s:\n{disliked}\n"
    )
    listwise_question: str = "Candidate {noun}s:\n{candidates}\n{hint}Top five, best first, one per line. Answer:"
    listwise_hint: str = "Hint: another recommender system ranks these first:\n{ranked}\n"


@dataclasses.dataclass
class PromptsConfig:
    """The three RecRanker prompt tasks and their ablation switches.

    rating_mode: half-star ratings in answers and histories are rounded half up
      to 1..H (round) or doubled onto 1..2H (double). position_shift / hints:
      the paper's position shifting and prompt enhancement. max_tokens: the
      prompt budget; the oldest history items are dropped first. tokenizer: a
      local Hugging Face tokenizer or checkpoint folder, a `.gguf` file (or
      `package:<pkg>/<file>`), or null to train a
      byte-level BPE of `tokenizer_vocab_size` on the run's own prompts.
    """

    tasks: list[str] = dataclasses.field(default_factory=lambda: ["pointwise", "pairwise", "listwise"])
    item_noun: str | None = None
    rating_mode: Literal["round", "double"] = "round"
    position_shift: bool = True
    hints: bool = True
    history_items: int = 50
    disliked_items: int = 10
    listwise_liked: int = 5
    listwise_candidates: int = 10
    pairs: int = 5
    inference_listwise_order: Literal["shuffle", "retrieval"] = "shuffle"
    max_tokens: int = 1024
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 4096
    templates: TemplatesConfig = dataclasses.field(default_factory=TemplatesConfig)


@dataclasses.dataclass
class ModelConfig:
    """The ranker LLM: a local Hugging Face LLaMA folder or `.gguf` file (`checkpoint`; also
    `package:<pkg>/<file>`, a file an installed package ships), or, when null, a
    LLaMA-architecture model trained from scratch with the sizes below (vocabulary from the
    run's tokenizer). `dtype` is the compute dtype, `param_dtype` the stored weights'
    (bfloat16 halves their memory; LoRA adapters and optimizer moments stay float32).

    How it runs (not what it computes; not part of any stage's cache key): `scan_layers` runs
    the layers as one stacked block under `nnx.scan` (compile time independent of depth) or,
    false, as a Python loop; `attention` is the causal attention kernel (`llm/attention.py`:
    auto picks per platform)."""

    checkpoint: str | None = None
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    attention: Literal["auto", "tiled", "xla", "pallas_gpu", "cudnn", "splash"] = "auto"


@dataclasses.dataclass
class LoRAConfig:
    """LoRA adapters (the default for pretrained checkpoints); off = full fine-tuning."""

    enabled: bool = False
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0


@dataclasses.dataclass
class TrainConfig:
    """Instruction tuning: packed rows of `seq_len` tokens, `batch_size` rows a step (split
    over the mesh's batch axes); `remat` is the rematerialisation policy of the layers
    (`llm/remat.py`: none, minimal, dots, full, or auto: none on the CPU, dots elsewhere;
    not part of the finetune's cache key, like `model.scan_layers` and `model.attention`).
    profile_steps: [start, stop] traces the steps start .. stop - 1 (counted from 1) of the
    pretrain and finetune with `jax.profiler` into the stage folder's profile/; [] is off
    (instruments.py; an execution setting, like remat)."""

    enabled: bool = True  # false: no instruction tuning (the zero-shot baseline ranks the starting model)
    seq_len: int = 1152
    batch_size: int = 4
    steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    accumulation: int = 1
    save_every: int = 50
    keep_checkpoint: bool = False  # keep the last training checkpoint once the stage finished (else none)
    remat: Literal["auto", "none", "minimal", "dots", "full"] = "auto"
    profile_steps: list[int] = dataclasses.field(default_factory=list)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)


@dataclasses.dataclass
class PretrainConfig:
    """Domain pre-training (the pretrain stage, before instruction tuning): a causal-LM
    objective on every user's training interactions in time order, rendered as the prompts'
    history lines (`"title": rating`), in windows of at most `window_items` items (each must
    fit `train.seq_len` tokens); the finetune then starts from this model. It learns what the
    graph backbone ignores: which items follow which in a history. Off: the finetune starts
    from `model.checkpoint` or a fresh model. The model, mesh, LoRA and remat are train's."""

    enabled: bool = False
    window_items: int = 50
    stride_items: int = 25   # windows start every stride_items items (overlap = window - stride)
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 30


@dataclasses.dataclass
class RankConfig:
    """Re-ranking the backbone's candidates with the tuned LLM, and the hybrid's constants.

    methods: single tasks to score (each needs its prompts) plus `hybrid`.
    mode: scores (expected rating, P(Yes) vs P(No), constrained listwise decoding) or
      generate (the reference: free text, parsed; unreadable -> rating 3 / no preference).
    retrieval_weight: U_retrieval(c) = retrieval_weight * (k - r) for 0-based rank r.
    pair_credit: C2; list_credit: C3; list_positions: the listwise answer's length.
    alphas: hybrid weights of U_point, U_pair, U_list (1:1:1 is the reference's).
    tune_alphas: choose the hybrid weights on the validation item instead (each from 0, 0.25,
      0.5, 1, 2; the highest validation NDCG@ks[0], ties to the weights nearest `alphas`), and
      use them for every split; needs valid in `splits` (rank/hybrid.py tune_alphas).
    users: hits (only users whose held-out item is among the candidates; the others are
      misses whatever the LLM does) or all.
    candidates: retrieved (the backbone's top-k: the RecRanker protocol), planted (the
      backbone's top k-1 other items plus the held-out item, in backbone score order: every
      user counts, but the backbone order puts the held-out item last unless it is a hit) or
      sampled (the held-out item plus k-1 items the user never rated, drawn uniformly, in
      backbone score order: every user counts and the backbone order is a real baseline).
    baselines: non-LLM re-rankers shown as extra methods: transition (item-to-item
      transitions among training likes), random (a seeded random order: the reference under
      planted candidates) or any model of retrieval.models but the backbone (its scores on
      the same candidates); [] for none.
    sample_users: evaluate a seeded random sample of this many users (run.seed; the backbone
      and every method on the same users, so the paired tests stay paired), or null for all:
      for a model too slow to score every user under the planted or sampled evaluation.
    """

    methods: list[str] = dataclasses.field(default_factory=lambda: ["pointwise", "pairwise", "listwise", "hybrid"])
    mode: Literal["scores", "generate"] = "scores"
    retrieval_weight: float = 0.05
    pair_credit: float = 0.5
    list_credit: float = 0.025
    list_positions: int = 5
    alphas: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0, 1.0])
    tune_alphas: bool = False
    users: Literal["hits", "all"] = "hits"
    candidates: Literal["retrieved", "planted", "sampled"] = "retrieved"
    baselines: list[str] = dataclasses.field(default_factory=lambda: ["transition", "random"])
    sample_users: int | None = None
    splits: list[str] = dataclasses.field(default_factory=lambda: ["test", "valid"])
    ks: list[int] = dataclasses.field(default_factory=lambda: [3, 5, 10])
    batch_size: int = 16
    generate_tokens: int = 96
    bootstrap: int = 1000


@dataclasses.dataclass
class Config:
    """The whole configuration of a run; later stages add their sections here."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    retrieval: RetrievalConfig = dataclasses.field(default_factory=RetrievalConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    rank: RankConfig = dataclasses.field(default_factory=RankConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def recorded(self) -> dict[str, Any]:
        """The config as a run records it (config.yaml, each stage's _stage.json): without the
        settings of one command (`COMMAND_SETTINGS`)."""
        plain = self.to_dict()
        for section, keys in COMMAND_SETTINGS.items():
            for key in keys:
                plain[section].pop(key, None)
        return plain

    def validate(self) -> Config:
        """Every range, vocabulary and cross-section check (`config_checks`), one RecRankerError
        naming the key for the first failure; returns the config."""
        from recranker_jax.config_checks import check_config

        check_config(self)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


def fingerprint(*parts: Any) -> str:
    """A stable hash of config sections (dataclasses or plain data) for stage caching."""
    plain = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return repr(tp).replace("typing.", "")
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", repr(tp))


class OverrideText(str):
    """A command-line override value, kept as text until its field's type is known: a string
    field takes it verbatim ("Prefer {first}?" stays text), any other field parses it as YAML."""


def _accepts_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted where lossless."""
    if isinstance(value, OverrideText):
        if _accepts_str(tp) and not (value.strip() in ("null", "~") and type(None) in typing.get_args(tp)):
            return str(value)
        try:
            value = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            value = str(value)

    def wrong() -> RecRankerError:
        return RecRankerError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecRankerError(f"config key {key}: expected a mapping of fields, got {value!r}")
        return _from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise wrong()
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except RecRankerError:
                pass
        raise wrong()
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise wrong()
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise wrong()
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, item_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise wrong()
        return {_coerce(k, key_type, key): _coerce(v, item_type, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong()
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in hints:
            where = f"{prefix}.{name}" if prefix else str(name)
            raise RecRankerError(
                f"unknown config key {where}; known keys here: {', '.join(names)}"
            )
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
        for name, value in data.items()
    }
    return cls(**kwargs)


def _merge(base: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = base
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecRankerError(f"config override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["data.min_likes=5", "mesh.shape=[2,4,1]"] into a nested dict of `OverrideText`s."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise RecRankerError(f"override {item!r}: expected dotted.key=value, e.g. data.min_likes=5")
        _merge(nested, key, OverrideText(text))
    return nested


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def bundled_config_dir() -> Path:
    """configs/ of a source checkout, or the copy packaged inside an installed wheel."""
    packaged = Path(str(resources.files("recranker_jax"))) / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a bundled config ("quickstart")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise RecRankerError(f"config file {name_or_path} is a folder; pass a YAML file (e.g. {path / 'config.yaml'} "
                             "of a run) or the name of a bundled config")
    bundled = bundled_config_dir() / f"{name_or_path}.yaml"
    if path.suffix == "" and bundled.is_file():
        return bundled
    available = sorted(p.stem for p in bundled_config_dir().glob("*.yaml"))
    raise RecRankerError(
        f"config file {name_or_path} not found; pass a YAML path or one of: {', '.join(available)}"
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a mapping that repeats a key is an error (not the last value silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by the keys beside it
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is None:
                seen[key] = key_node.start_mark.line + 1
            else:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's mapping; one RecRankerError with the file (and line) when it is not valid
    YAML, repeats a key in one mapping, is empty, or is not a mapping."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise RecRankerError(f"config file {path}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecRankerError(f"config file {path}: expected UTF-8 text YAML") from None
    if data is None:
        raise RecRankerError(f"config file {path} line 1: the file is empty (or only comments); expected a mapping of "
                             "sections, e.g. `run: {name: myrun}`")
    if not isinstance(data, dict):
        raise RecRankerError(f"config file {path}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (if any) <- dotted overrides, checked against the dataclasses."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        resolved = resolve_config_path(str(path))
        data = read_yaml(resolved)
        source = str(resolved)
    data = _deep_update(data, parse_overrides(list(overrides or [])))
    try:
        return _from_dict(Config, data).validate()
    except RecRankerError as err:
        raise RecRankerError(f"{err} (in {source}{' + overrides' if overrides else ''})") from None


def dump_config(cfg: Config) -> str:
    """The YAML of the config as a run records it (`Config.recorded`)."""
    return yaml.safe_dump(cfg.recorded(), sort_keys=False)
