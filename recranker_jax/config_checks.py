"""Every check of a config's values, once: ranges, the names a key accepts, rules across
sections, and the mesh arithmetic (a mesh shape on N devices, a batch over its batch shards).
`Config.validate()` runs the static ones when a config loads; the modules acting on a value
import its vocabulary from here. Each failure is one RecRankerError naming the key.
"""

from __future__ import annotations

import math
import numbers
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from recranker_jax.errors import RecRankerError

FILE_SOURCES = ("ml-100k", "ml-1m", "bookcrossing")
SOURCES = ("movielens-small", *FILE_SOURCES, "tfds:<name>")
# The retrieval models by name and whether each ranks items (may be retrieval.backbone); the
# built-in ones, and any that `retrieval.backbones.register_backbone` adds (before the config loads).
RETRIEVAL_MODELS: dict[str, bool] = {"lightgcn": True, "mf": True, "explicit_mf": False, "popularity": True,
                                     "sasrec": True}


def register_model_name(name: str, ranks: bool) -> None:
    """Make `name` a valid entry of retrieval.models (and of retrieval.backbone when it ranks)."""
    RETRIEVAL_MODELS[name] = ranks


SAMPLING_STRATEGIES = ("uniform", "importance", "cluster", "adaptive")
TASKS = ("pointwise", "pairwise", "listwise")
METHODS = (*TASKS, "hybrid")
TRANSITION, RANDOM = "transition", "random"  # the non-model baselines of rank.baselines
RANK_SPLITS = ("test", "valid")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LORA_TARGETS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# The placeholders each prompt template must hold (no more, no fewer).
TEMPLATE_PLACEHOLDERS = {
    "pointwise_instruction": {"noun", "max_rating", "history"},
    "pointwise_question": {"noun", "target", "max_rating", "hint"},
    "pointwise_hint": {"rating"},
    "pairwise_instruction": {"noun", "history", "disliked"},
    "pairwise_question": {"first", "second", "hint"},
    "pairwise_hint": {"preferred"},
    "listwise_instruction": {"noun", "history", "disliked"},
    "listwise_question": {"noun", "candidates", "hint"},
    "listwise_hint": {"ranked"},
}


def _positive(section: str, owner: Any, keys: Sequence[str]) -> None:
    for key in keys:
        if getattr(owner, key) < 1:
            raise RecRankerError(f"{section}.{key}={getattr(owner, key)}: expected a positive integer")


def _non_negative(section: str, owner: Any, keys: Sequence[str]) -> None:
    """Counts that may be 0 (warmup steps, LightGCN layers) and weights that may be 0 (l2, decay)."""
    for key in keys:
        if getattr(owner, key) < 0:
            raise RecRankerError(f"{section}.{key}={getattr(owner, key)}: expected 0 or more")


def _learning_rates(section: str, owner: Any, keys: Sequence[str] = ("lr",)) -> None:
    """A learning rate is a finite positive number (0 learns nothing; a negative one climbs the loss)."""
    for key in keys:
        value = getattr(owner, key)
        if not (math.isfinite(value) and value > 0):
            raise RecRankerError(f"{section}.{key}={value}: expected a positive learning rate, e.g. 1e-3")


def check_finite(config: Any, prefix: str = "") -> None:
    """Every number of a config (any section, nested lists included) is finite: nan and inf are no
    setting (YAML reads .nan / .inf, and float('nan') parses as one)."""
    import dataclasses

    def walk(value: Any, key: str) -> None:
        if dataclasses.is_dataclass(value):
            for field in dataclasses.fields(value):
                walk(getattr(value, field.name), f"{key}.{field.name}" if key else field.name)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{key}[{i}]")
        elif isinstance(value, float) and not math.isfinite(value):
            raise RecRankerError(f"{key}={value}: expected a finite number")

    walk(config, prefix)


# run.seed seeds numpy generators, scikit-learn and jax.random keys: numpy's seeding range (a 32-bit
# unsigned integer), which every one of them accepts. A seed outside it is refused, not mapped.
SEED_LIMIT = 2**32


def _has_control_characters(text: str) -> bool:
    import unicodedata

    return any(unicodedata.category(c) == "Cc" for c in text)


def check_run(run: Any) -> None:
    """run.name is one folder inside run.root: not empty, no path separator, not . or .., no
    control characters (a newline or a tab would make a folder no one can type); run.root is a
    folder of this machine's filesystem (stages write it with ordinary file I/O); run.seed is in
    0 .. 2**32 - 1 (`SEED_LIMIT`)."""
    if "://" in run.root:
        raise RecRankerError(f"run.root={run.root}: expected a folder path; a bucket is used through a mount "
                             "(e.g. gcsfuse: run.root=/mnt/bucket/runs), since the stages write plain files")
    if not run.root or _has_control_characters(run.root):
        raise RecRankerError(f"run.root={run.root!r}: expected a folder path without control characters")
    name = run.name
    if (not name.strip() or "/" in name or "\\" in name or name in (".", "..") or name != name.strip()
            or _has_control_characters(name)):
        raise RecRankerError(f"run.name={name!r}: expected a folder name inside run.root (no '/', no control "
                             "characters, not empty, not '.' or '..')")
    if not 0 <= run.seed < SEED_LIMIT:
        raise RecRankerError(f"run.seed={run.seed}: expected an integer from 0 to {SEED_LIMIT - 1}")


def check_data(data: Any) -> None:
    source = data.source
    if source not in SOURCES[:-1] and not source.startswith("tfds:"):
        raise RecRankerError(f"unknown data.source {source!r}; expected one of: {', '.join(SOURCES)}")
    check_min_likes(data.min_likes)


def check_min_likes(min_likes: int) -> None:
    """A kept user has a test, a validation and at least one training like."""
    if min_likes < 3:
        raise RecRankerError(f"data.min_likes={min_likes}: expected >= 3 (a test, a validation and a training like)")


def check_retrieval(retrieval: Any) -> None:
    known = RETRIEVAL_MODELS  # the built-in models and any registered since
    unknown = [m for m in retrieval.models if m not in known]
    if unknown:
        raise RecRankerError(f"retrieval.models: unknown {unknown}; expected some of {', '.join(known)}")
    if retrieval.backbone not in retrieval.models or not known[retrieval.backbone]:
        raise RecRankerError(
            f"retrieval.backbone={retrieval.backbone!r}: expected one of the ranking models in retrieval.models "
            f"({', '.join(m for m in known if known[m])}), got models {retrieval.models}"
        )
    _positive("retrieval", retrieval, ("candidates", "dim", "batch_size", "epochs", "eval_every", "patience",
                                       "eval_batch_users"))
    _non_negative("retrieval", retrieval, ("layers", "l2"))
    _learning_rates("retrieval", retrieval)
    explicit = retrieval.explicit_mf
    _positive("retrieval.explicit_mf", explicit, ("dim", "batch_size", "epochs", "eval_every", "patience"))
    _non_negative("retrieval.explicit_mf", explicit, ("l2",))
    _learning_rates("retrieval.explicit_mf", explicit)
    sequence = retrieval.sequence
    _positive("retrieval.sequence", sequence, ("dim", "blocks", "heads", "batch_size", "epochs", "eval_every", "patience"))
    _non_negative("retrieval.sequence", sequence, ("l2",))
    _learning_rates("retrieval.sequence", sequence)
    if sequence.max_len < 2:
        raise RecRankerError(f"retrieval.sequence.max_len={sequence.max_len}: expected at least 2 (a like and the one "
                             "that follows it)")
    if sequence.dim % sequence.heads:
        raise RecRankerError(f"retrieval.sequence.heads={sequence.heads}: expected a divisor of retrieval.sequence.dim="
                             f"{sequence.dim}")
    if not 0 <= sequence.dropout < 1:
        raise RecRankerError(f"retrieval.sequence.dropout={sequence.dropout}: expected 0 <= dropout < 1")


def check_sampling(sampling: Any) -> None:
    if sampling.strategy not in SAMPLING_STRATEGIES:
        raise RecRankerError(f"sampling.strategy: expected one of {', '.join(SAMPLING_STRATEGIES)}, "
                             f"got {sampling.strategy!r}")
    if isinstance(sampling.size, bool) or not isinstance(sampling.size, numbers.Integral) or sampling.size < 1:
        raise RecRankerError(f"sampling.size: expected an integer >= 1, got {sampling.size!r}")
    if not 0.0 < sampling.fraction <= 1.0:
        raise RecRankerError(f"sampling.fraction: expected a number in (0, 1], got {sampling.fraction!r}")
    if not 0.0 < sampling.penalty <= 1.0:
        raise RecRankerError(f"sampling.penalty: expected a number in (0, 1], got {sampling.penalty!r}")
    if (isinstance(sampling.clusters, bool) or not isinstance(sampling.clusters, numbers.Integral)
            or sampling.clusters < 1):
        raise RecRankerError(f"sampling.clusters: expected an integer >= 1, got {sampling.clusters!r}")


def check_templates(templates: Any) -> None:
    """Every template must contain exactly the placeholders its task fills."""
    for name, required in TEMPLATE_PLACEHOLDERS.items():
        text = getattr(templates, name)
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
        except ValueError as err:
            raise RecRankerError(f"prompts.templates.{name}: not a valid format string ({err})") from None
        missing, unknown = required - fields, fields - required
        expected = ", ".join("{" + f + "}" for f in sorted(required))
        if missing:
            raise RecRankerError(f"prompts.templates.{name}: placeholder {{{sorted(missing)[0]}}} is missing; "
                                 f"expected {expected}")
        if unknown:
            raise RecRankerError(f"prompts.templates.{name}: unknown placeholder {{{sorted(unknown)[0]}}}; "
                                 f"expected {expected}")


def check_prompts(cfg: Any) -> None:
    prompts = cfg.prompts
    unknown = [t for t in prompts.tasks if t not in TASKS]
    if unknown or not prompts.tasks:
        raise RecRankerError(f"prompts.tasks={prompts.tasks}: expected a non-empty subset of {', '.join(TASKS)}")
    _positive("prompts", prompts, ("history_items", "listwise_liked", "listwise_candidates", "pairs", "max_tokens",
                                   "tokenizer_vocab_size"))
    _non_negative("prompts", prompts, ("disliked_items",))
    if prompts.listwise_liked >= prompts.listwise_candidates:
        raise RecRankerError(f"prompts.listwise_liked={prompts.listwise_liked}: expected fewer than "
                             f"prompts.listwise_candidates={prompts.listwise_candidates}")
    if prompts.hints and "pointwise" in prompts.tasks and "explicit_mf" not in cfg.retrieval.models:
        raise RecRankerError("prompts.hints with the pointwise task needs the explicit MF: add explicit_mf to "
                             "retrieval.models or set prompts.hints=false")
    check_templates(prompts.templates)


def normalise_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """LoRA targets: 'q' or 'q_proj' -> 'q_proj', in the given order without repeats."""
    if isinstance(targets, str):
        targets = [targets]
    names = []
    for target in targets:
        name = target if str(target).endswith("_proj") else f"{target}_proj"
        if name not in LORA_TARGETS:
            valid = ", ".join(n.removesuffix("_proj") for n in LORA_TARGETS)
            raise RecRankerError(f"unknown LoRA target {target!r}; expected some of {valid} (or their *_proj names)")
        if name not in names:
            names.append(name)
    if not names:
        raise RecRankerError("LoRA targets are empty; expected some of q, k, v, o, gate, up, down")
    return tuple(names)


def check_lora(rank: Any, alpha: float, dropout: float) -> None:
    """LoRA's rank, alpha and dropout (train.lora.*)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise RecRankerError(f"LoRA rank={rank!r}: expected an integer >= 1")
    if not math.isfinite(alpha) or alpha <= 0:
        raise RecRankerError(f"LoRA alpha={alpha!r}: expected a positive number")
    if not 0.0 <= dropout < 1.0:
        raise RecRankerError(f"LoRA dropout={dropout!r}: expected a rate in [0, 1)")


def check_model(model: Any) -> None:
    """The sizes of a model trained from scratch (a checkpoint brings its own): positive, and the
    heads dividing the hidden size, the key-value heads dividing the heads."""
    _positive("model", model, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads"))
    if model.rope_theta <= 0:
        raise RecRankerError(f"model.rope_theta={model.rope_theta}: expected a positive number")
    if model.checkpoint is None and model.hidden_size % model.num_attention_heads:
        raise RecRankerError(f"model.num_attention_heads={model.num_attention_heads}: expected a divisor of "
                             f"model.hidden_size={model.hidden_size}")
    if model.checkpoint is None and model.num_attention_heads % model.num_key_value_heads:
        raise RecRankerError(f"model.num_key_value_heads={model.num_key_value_heads}: expected a divisor of "
                             f"model.num_attention_heads={model.num_attention_heads}")


def check_profile_steps(steps: Sequence[int], key: str = "train.profile_steps") -> None:
    """[] (off) or [start, stop] with 1 <= start < stop (instruments.StepProfiler)."""
    if steps and (len(steps) != 2 or steps[0] < 1 or steps[1] <= steps[0]):
        raise RecRankerError(f"{key}={list(steps)}: expected [] (off) or [start, stop] with 1 <= start < stop "
                             "(the steps start .. stop - 1, counted from 1 like train_log.jsonl)")


def parse_profile_steps(text: str, key: str = "--profile") -> list[int]:
    """`START:STOP` -> [START, STOP] (the steps START .. STOP - 1, counted from 1 like train_log.jsonl)."""
    start, sep, stop = text.partition(":")
    try:
        steps = [int(start), int(stop)] if sep else None
    except ValueError:
        steps = None
    if steps is None:
        raise RecRankerError(f"{key} {text}: expected START:STOP, e.g. 3:5 traces steps 3 and 4")
    check_profile_steps(steps, f"{key} {text}: steps")
    return steps


def check_train(cfg: Any) -> None:
    _positive("train", cfg.train, ("seq_len", "batch_size", "steps", "save_every", "accumulation"))
    _non_negative("train", cfg.train, ("warmup_steps", "weight_decay"))
    _learning_rates("train", cfg.train)
    check_profile_steps(cfg.train.profile_steps)
    if cfg.train.clip_norm <= 0:
        raise RecRankerError(f"train.clip_norm={cfg.train.clip_norm}: expected a positive gradient norm")
    if cfg.model.checkpoint and not cfg.prompts.tokenizer:
        raise RecRankerError("model.checkpoint is set: set prompts.tokenizer to the same folder so prompts are "
                             "tokenised with the checkpoint's own tokenizer")
    lora = cfg.train.lora
    if lora.enabled:
        normalise_targets(lora.targets)
        check_lora(lora.rank, lora.alpha, lora.dropout)


def check_pretrain(cfg: Any) -> None:
    p = cfg.pretrain
    _positive("pretrain", p, ("steps", "batch_size", "stride_items"))
    _non_negative("pretrain", p, ("warmup_steps",))
    _learning_rates("pretrain", p)
    if p.window_items < 2:
        raise RecRankerError(f"pretrain.window_items={p.window_items}: expected at least 2 (an item and its successor)")
    if p.stride_items > p.window_items:
        raise RecRankerError(f"pretrain.stride_items={p.stride_items}: expected at most pretrain.window_items="
                             f"{p.window_items} (windows would skip items)")


def check_rank(cfg: Any) -> None:
    r = cfg.rank
    unknown = [m for m in r.methods if m not in METHODS]
    if unknown or not r.methods:
        raise RecRankerError(f"rank.methods={r.methods}: expected a non-empty subset of {', '.join(METHODS)}")
    missing = [t for t in r.methods if t in TASKS and t not in cfg.prompts.tasks]
    if missing:
        raise RecRankerError(f"rank.methods includes {missing[0]} but prompts.tasks={cfg.prompts.tasks} "
                             "builds no such prompts")
    if len(r.alphas) != 3:
        raise RecRankerError(f"rank.alphas={r.alphas}: expected 3 weights (pointwise, pairwise, listwise)")
    if r.tune_alphas and ("valid" not in r.splits or "hybrid" not in r.methods):
        raise RecRankerError(f"rank.tune_alphas=true chooses the hybrid's weights on the validation item: expected valid "
                             f"in rank.splits (got {r.splits}) and hybrid in rank.methods (got {r.methods})")
    if not r.splits or any(s not in RANK_SPLITS for s in r.splits):
        raise RecRankerError(f"rank.splits={r.splits}: expected a non-empty subset of test, valid")
    _positive("rank", r, ("batch_size", "list_positions", "generate_tokens"))
    _non_negative("rank", r, ("bootstrap",))
    if r.sample_users is not None and r.sample_users < 1:
        raise RecRankerError(f"rank.sample_users={r.sample_users}: expected a positive number of users, or null for all")
    if not r.ks or min(r.ks) < 1 or max(r.ks) > cfg.retrieval.candidates:
        raise RecRankerError(f"rank.ks={r.ks}: expected cut-offs between 1 and "
                             f"retrieval.candidates={cfg.retrieval.candidates}")
    check_baselines(cfg)


def check_baselines(cfg: Any) -> None:
    """rank.baselines: transition, random, or models of retrieval.models other than the backbone,
    once each."""
    allowed = [TRANSITION, RANDOM, *(m for m in cfg.retrieval.models if m != cfg.retrieval.backbone)]
    for name in cfg.rank.baselines:
        if name not in allowed or cfg.rank.baselines.count(name) > 1:
            why = "listed twice" if name in allowed else "unknown"
            raise RecRankerError(f"rank.baselines={cfg.rank.baselines}: {name!r} {why}; expected some of "
                                 f"{', '.join(allowed)} (transition, random, or a model of retrieval.models but the backbone)")


# The local paths a later stage reads from the config, checked before the stages still to run
# start (data.path needs no early check: the data stage runs first and names what it expected).
STAGE_PATHS = {"instructions": ("prompts.tokenizer",), "finetune": ("model.checkpoint", "prompts.tokenizer")}


def check_paths(cfg: Any, stages: Sequence[str]) -> None:
    """Every local path these stages read exists (`package:<pkg>/<file>`: the installed package
    ships the file) and a .gguf one can be read (the gguf package), before any of them runs."""
    from recranker_jax.model_files import require_gguf, resolve_model_path

    for stage in stages:
        for dotted in STAGE_PATHS.get(stage, ()):
            section, key = dotted.split(".")
            value = getattr(getattr(cfg, section), key)
            if value is None:
                continue  # not set: the stage makes do without (or says the key is needed)
            path: Path = resolve_model_path(value, dotted)
            if not path.exists():
                raise RecRankerError(f"{dotted}={value}: no such file or folder")
            if path.suffix == ".gguf":
                require_gguf(f"{dotted}={value}")
            elif path.is_dir():
                check_model_folder(dotted, value, path)


# What a folder must hold to be read as a model (Hugging Face LLaMA) or as a tokenizer.
MODEL_FILES = ("config.json", "*.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model_folder(dotted: str, value: str, path: Path) -> None:
    """A model.checkpoint folder holds config.json and safetensors weights; a prompts.tokenizer
    folder holds a tokenizer file: said in one line before any stage runs, not after the data
    and retrieval stages."""
    if dotted == "model.checkpoint":
        missing = [pattern for pattern in MODEL_FILES if not any(path.glob(pattern))]
        if missing:
            raise RecRankerError(f"{dotted}={value}: the folder has no {' and no '.join(missing)}; expected a Hugging "
                                 "Face LLaMA checkpoint folder (config.json and model*.safetensors) or a .gguf file")
    elif dotted == "prompts.tokenizer" and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise RecRankerError(f"{dotted}={value}: the folder holds no tokenizer ({', '.join(TOKENIZER_FILES)}); expected "
                             "the checkpoint's folder, a tokenizer folder or a .gguf file")


# ----------------------------------------------------------------------------- sizes that cannot fit

def check_fits(key: str, value: int, per_unit: float, fixed: float, capacity: int | None, what: str,
               where: str) -> None:
    """The one rule for sizes, checked before the allocation: `what` needs at least
    `fixed + value * per_unit` bytes (a lower bound: the estimate never refuses what would fit),
    which must not exceed `capacity` (`where` names it). Else one line naming the setting `key`
    and its largest workable value (nothing when capacity is unknown)."""
    needed = fixed + value * per_unit
    if capacity is None or needed <= capacity:
        return
    largest = int((capacity - fixed) // per_unit) if capacity > fixed else 0
    advice = (f"the largest workable {key} is at most about {largest:,}" if largest >= 1 else
              f"even {key}=1 does not fit (the rest of the setup needs {_size(fixed)})")
    raise RecRankerError(f"{key}={value}: {what} needs at least {_size(needed)}, more than {where} "
                         f"({_size(capacity)}); {advice}")


def _size(count: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count / 1e3:,.1f} kB"


# ----------------------------------------------------------------------------- the mesh

def check_mesh(shape: Sequence[int], axes: Sequence[str], rules: Mapping[str, Sequence[str]]) -> None:
    """What a mesh needs whatever the device count: a size per axis, rules naming only its axes."""
    if len(shape) != len(axes):
        raise RecRankerError(f"mesh.shape={list(shape)} and mesh.axes={list(axes)}: expected equal lengths")
    unknown = sorted({a for names in rules.values() for a in names} - set(axes))
    if unknown:
        raise RecRankerError(f"mesh.rules name mesh axes {unknown} that are not in mesh.axes={list(axes)}")
    _check_shape(shape)


def _check_shape(shape: Sequence[int]) -> None:
    if any(s == 0 or s < -1 for s in shape):
        raise RecRankerError(f"mesh.shape={list(shape)}: entries must be positive or -1")
    if sum(s == -1 for s in shape) > 1:
        raise RecRankerError(f"mesh.shape={list(shape)}: at most one entry may be -1")


def resolve_mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Replace one -1 by the devices left over; check the product equals n_devices."""
    _check_shape(shape)
    fixed = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % fixed:
            raise RecRankerError(f"mesh.shape={list(shape)}: the fixed axes ({fixed} devices) do not divide "
                                 f"the {n_devices} available devices")
        shape = [n_devices // fixed if s == -1 else s for s in shape]
    if math.prod(shape) != n_devices:
        raise RecRankerError(f"mesh.shape={list(shape)} uses {math.prod(shape)} devices, but a mesh must use all "
                             f"{n_devices} available devices (one entry may be -1: the rest)")
    return tuple(shape)


def shards(logical_name: str, rules: Mapping[str, Sequence[str]], sizes: Mapping[str, int]) -> int:
    """How many shards a dimension with this logical name is split into on a mesh of `sizes`."""
    return math.prod(sizes.get(axis, 1) for axis in rules.get(logical_name, []))


def check_batch(key: str, batch_size: int, rules: Mapping[str, Sequence[str]], sizes: Mapping[str, int]) -> None:
    """A batch (config key `key`) must split evenly over the mesh's batch shards."""
    batch_shards = shards("batch", rules, sizes)
    if batch_size % batch_shards:
        mesh = ", ".join(f"{axis}={size}" for axis, size in sizes.items())
        raise RecRankerError(f"{key}={batch_size} must be a multiple of the {batch_shards} batch shards of the mesh "
                             f"({mesh})")


def check_config(cfg: Any) -> None:
    """Every static check of a whole config (`Config.validate`)."""
    check_finite(cfg)
    check_run(cfg.run)
    check_data(cfg.data)
    check_mesh(cfg.mesh.shape, cfg.mesh.axes, cfg.mesh.rules)
    check_retrieval(cfg.retrieval)
    check_sampling(cfg.sampling)
    check_prompts(cfg)
    check_pretrain(cfg)
    check_model(cfg.model)
    check_train(cfg)
    check_rank(cfg)
