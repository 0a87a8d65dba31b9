"""Docs that cannot drift: every code block of README.md and docs/*.md is read, and

- every `recranker` command parses with the CLI's own parser (subcommands and options exist),
  and the config it names loads with its key=value overrides (real keys, right types);
- every dotted config key named in code, fenced or inline, is a key of `config.Config`;
- every repository path and every relative link (with its #anchor) exists;
- every Python block compiles and its `recranker_jax` imports exist;
- the fast commands run: help pages, `config`, `data stats` (embedded data), `plan`, and the
  launchers' `--dry-run` / `--help`;
- the README stays one screen-ish, keeps CI's exact test command and maps every docs page.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from recranker_jax.cli import build_parser, main
from recranker_jax.config import load_config
from recranker_jax.config_keys import config_fields, leaf_keys

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = {key for key, _, _ in config_fields() if "." not in key}
ALL_KEYS = {key for key, _, _ in config_fields()}
REPO_ROOTS = ("configs/", "launch/", "recranker_jax/", "tests/", "docs/", "experiments/", ".ci/")
REPO_FILES = ("README.md", "pyproject.toml")
FILE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".json", ".jsonl", ".sh", ".csv", ".npz", ".png", ".html",
                 ".safetensors", ".gguf", ".zip", ".dat", ".txt", ".log")
CI_TEST_COMMAND = 'pip install -e ".[test,tfds,tpu]" && python -m pytest'
QUICKSTART_COMMAND = "pip install . && recranker quickstart"


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str


@dataclass
class Page:
    path: Path
    blocks: list[Block] = field(default_factory=list)
    spans: list[tuple[int, str]] = field(default_factory=list)  # inline `code` outside blocks
    links: list[tuple[int, str]] = field(default_factory=list)  # relative markdown link targets
    anchors: set[str] = field(default_factory=set)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def read_page(path: Path) -> Page:
    page, fence, buffer, start = Page(path), None, [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if fence is not None:
            if stripped == "```":
                page.blocks.append(Block(path, start, fence, "\n".join(buffer)))
                fence = None
            else:
                buffer.append(line)
            continue
        if stripped.startswith("```"):
            fence, buffer, start = stripped[3:].strip(), [], number
            continue
        if line.startswith("#"):
            page.anchors.add(slug(line.lstrip("#")))
        page.spans += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
        page.links += [(number, target) for target in re.findall(r"\]\(([^)\s]+)\)", line)
                       if not re.match(r"[a-z]+:", target)]
    assert fence is None, f"{path}: a code block opened at line {start} is not closed"
    return page


def shell_commands(code: str) -> list[list[str]]:
    """Commands of a shell block: continuations joined, comments dropped, split at && ; |."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words: list[str] = []
        for token in lexer:
            if token in ("&&", ";", "|", "||", "&"):
                commands.append(words)
                words = []
            else:
                words.append(token)
        commands.append(words)
    return [c for c in commands if c]


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        name, _, value = words[0].partition("=")
        env[name] = value
        words = words[1:]
    return env, words


def recranker_words(words: list[str]) -> list[str] | None:
    """The arguments after `recranker` (or `python -m recranker_jax.cli`), else None."""
    if words and words[0] == "recranker":
        return words[1:]
    if words[:3] == ["python", "-m", "recranker_jax.cli"]:
        return words[3:]
    return None


def launcher_words(words: list[str]) -> list[str] | None:
    """[script, args...] for `launch/x.sh ...` or `bash launch/x.sh ...`, else None."""
    if words and words[0] == "bash":
        words = words[1:]
    return words if words and words[0].startswith("launch/") else None


# ----------------------------------------------------------------------------- checks


def parse(args: list[str]):
    """(namespace or None, error text); --help pages are printed to a buffer (they run here)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(args), ""
        except SystemExit as exit_info:
            if exit_info.code == 0:
                assert out.getvalue().startswith(("usage: recranker", "recranker-jax ")), out.getvalue()[:200]
                return None, ""
            return None, err.getvalue().strip().splitlines()[-1]


def check_key(key: str) -> str | None:
    """None when `key` (dotted, maybe ending .*) names config keys; else what is wrong."""
    if key.endswith(".*"):
        prefix = key[:-1]
        return None if any(k.startswith(prefix) for k in ALL_KEYS) else f"no config key under {key}"
    if key in ALL_KEYS or key.startswith("mesh.rules."):
        return None
    return f"{key} is not a config key"


def check_recranker(args: list[str], load: bool = True) -> str | None:
    namespace, error = parse(args)
    if error:
        return error
    if namespace is None:  # a help page
        return None
    overrides = getattr(namespace, "overrides", None) or []
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep:
            return f"{override}: expected key=value"
        if problem := check_key(key):
            return problem
    if load and hasattr(namespace, "config") and not getattr(namespace, "runs", None):
        cwd = os.getcwd()
        try:
            os.chdir(REPO)  # config paths in the docs are relative to the repository
            load_config(namespace.config, overrides)
        except Exception as err:  # noqa: BLE001 - any failure to load is the finding
            return f"config does not load: {err}"
        finally:
            os.chdir(cwd)
    return None


def check_path(token: str) -> str | None:
    token = token.rstrip(".,:;)")
    if token.startswith("~") or "://" in token:
        return None
    if token.endswith(".py") and re.match(r"^[a-z_]+(/[a-z_]+)*\.py$", token) and not token.startswith(REPO_ROOTS):
        # a module named relative to the package (rank/hybrid.py, model_files.py)
        return None if (REPO / "recranker_jax" / token).is_file() else f"{token}: no such module in recranker_jax/"
    candidate = token.split(":", 1)[0] if token.startswith(REPO_ROOTS) else token
    if not (candidate.startswith(REPO_ROOTS) or candidate in REPO_FILES):
        return None
    pattern = re.sub(r"<[^>]*>", "*", candidate).replace("{", "*").replace("}", "*")
    pattern = re.sub(r"\*+", "*", pattern).rstrip("/") or "."
    return None if list(REPO.glob(pattern)) else f"{token}: no such path in the repository"


def dotted_keys(text: str) -> list[str]:
    """Dotted config keys named in a piece of code: `section.key`, with =value, : value or .*."""
    found = []
    for word in re.split(r"[\s'\"()]+", text):
        match = re.match(r"^([a-z_]+(?:\.[a-z_0-9]+)+(?:\.\*)?)(?:=|:|$)", word)
        if not match or match.group(1).split(".")[0] not in SECTIONS or word.endswith(FILE_SUFFIXES):
            continue
        found.append(match.group(1))
    return found


def page_problems(page: Page) -> list[str]:
    """Every static finding on one page: commands, keys, paths, links, Python blocks."""
    problems = []
    shown = page.path.relative_to(REPO) if page.path.is_relative_to(REPO) else page.path.name
    where = lambda line: f"{shown}:{line}"  # noqa: E731
    for block in page.blocks:
        if block.language in ("bash", "sh", "shell", "console", ""):
            for words in shell_commands(block.code):
                _, words = split_env(words)
                for word in words:
                    if problem := check_path(word.split("=", 1)[-1]):
                        problems.append(f"{where(block.line)}: {problem}")
                launch = launcher_words(words)
                if launch and "--" in launch:  # the command a launcher starts
                    words = launch[launch.index("--") + 1:]
                if (args := recranker_words(words)) is not None and (problem := check_recranker(args)):
                    problems.append(f"{where(block.line)}: `{' '.join(words)}`: {problem}")
        elif block.language == "python":
            problems += [f"{where(block.line)}: {p}" for p in python_problems(block.code)]
        if block.language in ("bash", "sh", "shell", "console", "", "yaml"):
            problems += [f"{where(block.line)}: {p}" for k in dotted_keys(block.code) if (p := check_key(k))]
        elif block.language == "python":  # keys in its string literals (its code has other dotted names)
            strings = " ".join(a or b for a, b in re.findall(r'"([^"]*)"|\'([^\']*)\'', block.code))
            problems += [f"{where(block.line)}: {p}" for k in dotted_keys(strings) if (p := check_key(k))]
    for line, span in page.spans:
        problems += [f"{where(line)}: {p}" for k in dotted_keys(span) if (p := check_key(k))]
        problems += [f"{where(line)}: {p}" for word in span.split() if (p := check_path(word))]
        if span.startswith("recranker ") and not re.search(r"<|\.\.\.|\[-|\bFILE\b|\bX\b", span):
            problem = check_recranker(shlex.split(span)[1:], load=False)
            named = len(shlex.split(span)) == 2  # `recranker compile`: a command named, not a command line
            if problem and not (re.search(r"required: (ACTION|BENCHMARK)$", problem)  # a command group, named
                                or (named and "the following arguments are required" in problem)):
                problems.append(f"{where(line)}: `{span}`: {problem}")
    for line, target in page.links:
        problems += [f"{where(line)}: {p}" for p in link_problems(page, target)]
    return problems


def link_problems(page: Page, target: str) -> list[str]:
    path_part, _, anchor = target.partition("#")
    linked = (page.path.parent / path_part).resolve() if path_part else page.path
    if not linked.exists():
        return [f"link {target}: {path_part} does not exist"]
    if anchor and linked.suffix == ".md" and anchor not in read_page(linked).anchors:
        return [f"link {target}: no heading #{anchor} in {linked.name}"]
    return []


def python_problems(code: str) -> list[str]:
    try:
        compile(code, "<docs>", "exec")
    except SyntaxError as err:
        return [f"Python block does not compile: {err}"]
    problems = []
    for module, names in re.findall(r"^\s*from (recranker_jax[\w.]*) import ([\w, ]+)", code, re.M):
        imported = importlib.import_module(module)
        problems += [f"{module} has no {name}" for name in (n.strip() for n in names.split(",")) if not hasattr(imported, name)]
    return problems


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_key_path_and_link_of_the_page_exists(path):
    problems = page_problems(read_page(path))
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_drifts(tmp_path):
    """The checker itself: a page with a wrong subcommand, option, key, value, path, link and import."""
    page = tmp_path / "bad.md"
    page.write_text("\n".join([
        "# Title", "", "```bash",
        "recranker retreival --config quickstart",
        "recranker data stats --jsn",
        "recranker quickstart train.stepz=3",
        "recranker quickstart train.steps=many",
        "recranker report --config no-such-config",
        "launch/tpu_pod.sh --dry-run -- recranker rank rank.candidate=sampled",
        "python experiments/no_such_script.py",
        "```", "",
        "Inline `recranker plan --meshes 1,2,1`, `rank.alphaz=[1,1,1]`, `configs/none.yaml`, [a](nowhere.md), "
        "[b](#no-such-heading).", "",
        "```python", "from recranker_jax.report import no_such_function", "```",
    ]))
    problems = "\n".join(page_problems(read_page(page)))
    for needle in ("invalid choice: 'retreival'", "unrecognized arguments: --jsn", "train.stepz is not a config key",
                   "config key train.steps: expected int", "config file no-such-config not found",
                   "rank.candidate is not a config key", "experiments/no_such_script.py: no such path",
                   "unrecognized arguments: --meshes", "rank.alphaz is not a config key", "configs/none.yaml: no such path",
                   "link nowhere.md", "no heading #no-such-heading", "recranker_jax.report has no no_such_function"):
        assert needle in problems, needle


def fast_commands() -> list[tuple[str, dict[str, str], list[str]]]:
    """(where, env, words) of the commands the docs show that run in seconds."""
    found = []
    for path in PAGES:
        for block in read_page(path).blocks:
            if block.language not in ("bash", "sh", ""):
                continue
            for words in shell_commands(block.code):
                env, words = split_env(words)
                args, launch = recranker_words(words), launcher_words(words)
                where = f"{path.relative_to(REPO)}:{block.line}: {' '.join(words)}"
                if launch and ("--dry-run" in launch or "--help" in launch):
                    found.append((where, env, launch))
                elif args is not None and not {"--help", "-h"} & set(args) and (
                        args[:1] in (["config"], ["plan"])
                        or (args[:2] == ["data", "stats"] and not any(a.startswith("data.path=") for a in args))):
                    found.append((where, env, ["recranker", *args]))
    return found


def test_the_fast_commands_run(tmp_path, capsys):
    commands = fast_commands()
    kinds = {"launcher" if words[0] != "recranker" else words[1] for _, _, words in commands}
    assert {"launcher", "config", "data", "plan"} <= kinds, kinds  # the docs show each kind; each runs
    runs_before = (REPO / "runs").exists()
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the docs' relative config paths; runs/ lands here
    failures = []
    for where, env, words in commands:
        if words[0] == "recranker":
            cwd = os.getcwd()
            os.chdir(tmp_path)
            try:
                code = main(words[1:])
            except SystemExit as exit_info:  # an argparse error
                code = exit_info.code
            finally:
                os.chdir(cwd)
            output = capsys.readouterr()
            if code != 0:
                failures.append(f"{where}: exit {code}: {output.err.strip()[-300:]}")
            continue
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RECRANKER_", "CONFIG", "DRY_RUN"))}
        environ.update({"PYTHON": sys.executable, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **env})
        done = subprocess.run(["bash", *words], cwd=REPO, env=environ, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            failures.append(f"{where}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
    assert not failures, "\n".join(failures)
    assert (REPO / "runs").exists() == runs_before  # dry runs start nothing and write nothing


def test_the_readme_is_short_keeps_the_two_commands_and_maps_every_page():
    readme = read_page(REPO / "README.md")
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
    bash_lines = [line.strip() for block in readme.blocks if block.language == "bash" for line in block.code.splitlines()]
    assert CI_TEST_COMMAND in bash_lines and QUICKSTART_COMMAND in bash_lines
    assert CI_TEST_COMMAND in (REPO / ".ci" / "run").read_text()  # CI runs the README's command verbatim
    linked = {target.split("#")[0] for _, target in readme.links}
    pages = {f"docs/{p.name}" for p in PAGES[1:]}
    assert pages <= linked, pages - linked
    assert {"getting-started.md", "pipeline.md", "llm.md", "scale-out.md", "benchmarks.md", "results.md",
            "extending.md", "troubleshooting.md"} <= {p.name for p in PAGES[1:]}


def test_every_key_the_docs_could_name_is_known_to_the_checker():
    assert set(leaf_keys()) <= ALL_KEYS and SECTIONS == {"run", "data", "mesh", "retrieval", "sampling", "prompts",
                                                          "model", "pretrain", "train", "rank"}
