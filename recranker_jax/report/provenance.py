"""What the report can say about how its run was built: each stage's `_stage.json` (the config
that built it, its version, its files' manifest), the keys on which the stages' recorded
configs disagree, and whether the files the report reads are still the ones their stage wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from recranker_jax.run import MARKER, STAGE_FOLDERS, RunFolder, file_digest, read_marker

# The stage files the report reads, by stage.
READ_FILES = {"retrieval": ("metrics.json",), "finetune": ("summary.json",), "rank": ("metrics.json",)}


def stage_markers(run: RunFolder) -> dict[str, dict]:
    """stage -> its `_stage.json`, for the stages of the run that finished, in pipeline order."""
    return {name: marker for name in STAGE_FOLDERS if (marker := read_marker(run.stage(name))) is not None}


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted key -> value (lists are values)."""
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def disagreements(configs: dict[str, dict]) -> list[tuple[str, dict[str, Any]]]:
    """(dotted key, {source: value}) for every key whose value is not the same in every config
    that has it; `configs` maps a source (a stage, config.yaml) to its nested config."""
    flat = {source: flatten(config) for source, config in configs.items()}
    keys = sorted({key for values in flat.values() for key in values})
    differing = []
    for key in keys:
        values = {source: values[key] for source, values in flat.items() if key in values}
        if len({repr(v) for v in values.values()}) > 1:
            differing.append((key, values))
    return differing


def recorded_configs(run: RunFolder, markers: dict[str, dict]) -> dict[str, dict]:
    """Each finished stage's recorded config, and config.yaml's, by source name."""
    configs = {f"{name} stage": marker.get("config") or {} for name, marker in markers.items()}
    if run.config.is_file():
        try:
            configs["config.yaml"] = yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            pass
    return configs


def check_read_files(run: RunFolder, markers: dict[str, dict]) -> list[tuple[str, str]]:
    """(file, state) for each stage file the report reads that is there: `verified` (size and
    SHA-256 as its stage's manifest recorded), `changed after the stage finished`, or `not
    verified` with the reason."""
    states = []
    for stage, names in READ_FILES.items():
        folder = run.stage(stage)
        for name in names:
            path = folder / name
            if not path.is_file():
                continue
            shown = f"{STAGE_FOLDERS[stage]}/{name}"
            recorded = (markers.get(stage) or {}).get("files")
            if recorded is None:
                states.append((shown, f"not verified (no {MARKER} manifest in {STAGE_FOLDERS[stage]}/)"))
            elif name not in recorded:
                states.append((shown, "changed after the stage finished (not in its manifest)"))
            else:
                size, digest = recorded[name]
                same = path.stat().st_size == size and file_digest(path) == digest
                states.append((shown, "verified" if same else "changed after the stage finished"))
    return states


def _cell(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text[:-4].strip() if text.endswith("...") else text
    text = text.replace("\n", " ").replace("|", "\\|")
    return f"`{text}`" if len(text) <= 80 else f"`{text[:77]}...`"


def provenance_section(run: RunFolder) -> tuple[list[str], list[str]]:
    """(warnings for the top of the report, the appendix's lines)."""
    from recranker_jax.report.tables import markdown

    markers = stage_markers(run)
    files = check_read_files(run, markers)
    differing = disagreements(recorded_configs(run, markers))
    warnings = [f"**Warning:** {name} {state}: the numbers below are not the ones its stage wrote."
                for name, state in files if state.startswith("changed")]
    if differing:
        warnings.append(f"Note: the stages' recorded configs differ in {len(differing)} key(s): "
                        f"{', '.join(k for k, _ in differing[:5])}{', ...' if len(differing) > 5 else ''} "
                        "(see \"How this run was built\").")
    lines = ["## How this run was built", ""]
    if not markers:
        lines += ["No stage folder has a `_stage.json`: nothing here can be verified.", ""]
    else:
        rows = [[name, str(m.get("version", "–")), str(m.get("seconds", "–")), f"`{m.get('key', '–')}`",
                 f"[{STAGE_FOLDERS[name]}/{MARKER}]({STAGE_FOLDERS[name]}/{MARKER})"] for name, m in markers.items()]
        lines += ["Each finished stage's `_stage.json` records the config that built it, the code's version and a "
                  "manifest of its files (sizes and SHA-256).", "",
                  markdown(["stage", "version", "seconds", "cache key", "recorded config"], rows), ""]
    if files:
        lines += ["Files this report read, checked against their stage's manifest:", "",
                  markdown(["file", "state"], [list(f) for f in files]), ""]
    if differing:
        sources = list(recorded_configs(run, markers))
        lines += ["Where the recorded configs disagree (a stage's cache key covers only the sections it depends "
                  "on, so e.g. a rank.* difference in the data stage is harmless; every other key is the same "
                  "everywhere):", "",
                  markdown(["key"] + sources, [[key] + [_cell(values[s]) if s in values else "–" for s in sources]
                                               for key, values in differing]), ""]
    elif markers:
        lines += ["Every stage recorded the same config: [config.yaml](config.yaml).", ""]
    return warnings, lines

