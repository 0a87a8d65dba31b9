import re

import pytest

from recranker_jax.cli import main
from recranker_jax.config import Config, fingerprint, load_config, resolve_config_path
from recranker_jax.errors import RecRankerError


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  min_likes: 6\n  source: ml-100k\nrun:\n  name: a\n")
    cfg = load_config(path, ["data.min_likes=7", "mesh.shape=[2,4,1]", "data.like_threshold=3"])
    assert cfg.data.min_likes == 7  # override beats file
    assert cfg.data.source == "ml-100k"  # file beats default
    assert cfg.run.name == "a"
    assert cfg.mesh.shape == [2, 4, 1]
    assert cfg.data.like_threshold == 3.0 and isinstance(cfg.data.like_threshold, float)
    assert cfg.data.on_bad_lines == "error"  # untouched default


def test_bundled_quickstart_matches_its_file():
    path = resolve_config_path("quickstart")
    assert path.name == "quickstart.yaml"
    cfg = load_config("quickstart")
    assert cfg.data.source == "movielens-small" and cfg.run.name == "quickstart"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.min_likez=3"], "unknown config key data.min_likez"),
        (["datum.source=x"], "unknown config key datum"),
        (["data.min_likes=abc"], "config key data.min_likes: expected int, got 'abc'"),
        (["data.min_likes=2.5"], "config key data.min_likes: expected int"),
        (["data.on_bad_lines=maybe"], "config key data.on_bad_lines: expected 'error' | 'skip'"),
        (["mesh.shape=[2,x]"], "config key mesh.shape[1]: expected int"),
        (["run.seed=true"], "config key run.seed: expected int, got True"),
        (["data"], "expected dotted.key=value"),
        (["data.source.x=1"], "config key data.source: expected str"),
    ],
)
def test_bad_keys_and_types_name_the_key(overrides, needle):
    with pytest.raises(RecRankerError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  source: [unclosed\n")
    with pytest.raises(RecRankerError, match=r"bad.yaml line \d+"):
        load_config(bad)
    with pytest.raises(RecRankerError, match="not found; pass a YAML path or one of: .*quickstart"):
        load_config(tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(RecRankerError, match="expected a mapping of sections"):
        load_config(listing)


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["data", "stats", "data.min_likes=abc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: config key data.min_likes")


def test_fingerprint_tracks_content():
    a, b = Config(), Config()
    assert fingerprint(a.data) == fingerprint(b.data)
    b.data.min_likes = 5
    assert fingerprint(a.data) != fingerprint(b.data)


def test_string_overrides_are_taken_verbatim_other_types_parsed():
    cfg = load_config(None, ["prompts.templates.pairwise_question=Prefer {first} over {second}? {hint}Answer:",
                             "run.name=007", "prompts.tokenizer=null", "prompts.tasks=[pointwise, listwise]",
                             "rank.methods=[pointwise, listwise, hybrid]"])  # a consistent config (validated)
    assert cfg.prompts.templates.pairwise_question == "Prefer {first} over {second}? {hint}Answer:"
    assert cfg.run.name == "007"  # a string field keeps the text, leading zeros included
    assert cfg.prompts.tokenizer is None
    assert cfg.prompts.tasks == ["pointwise", "listwise"]


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("retrieval:\n  lr: 1e-3\n")  # YAML 1.1 would read this as a string
    cfg = load_config(path, ["train.lr=2e-4"])
    assert cfg.retrieval.lr == 1e-3 and cfg.train.lr == 2e-4
    with pytest.raises(RecRankerError, match="config key train.lr: expected float, got 'fast'"):
        load_config(None, ["train.lr=fast"])


def test_every_section_is_checked_when_a_config_loads(tmp_path, capsys):
    """Range and cross-section mistakes fail at load, naming the key, before any stage runs."""
    for override, message in (("retrieval.backbone=explicit_mf", "retrieval.backbone='explicit_mf'"),
                              ("sampling.fraction=0", "sampling.fraction: expected a number in (0, 1]"),
                              ("prompts.listwise_liked=20", "prompts.listwise_liked=20: expected fewer than"),
                              ("train.lora.enabled=true", None), ("train.lora.rank=0", None),
                              ("rank.ks=[3, 20]", "rank.ks=[3, 20]: expected cut-offs between 1 and retrieval.candidates=10"),
                              ("mesh.shape=[2, 2]", "mesh.shape=[2, 2] and mesh.axes=['data', 'fsdp', 'tensor']"),
                              ("data.source=ml-10m", "unknown data.source 'ml-10m'")):
        if message is None:  # valid on its own
            load_config(None, [override])
            continue
        with pytest.raises(RecRankerError, match=re.escape(message)):
            load_config(None, [override])
        assert main(["data", "split", f"run.root={tmp_path}", override]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(RecRankerError, match="LoRA rank=0: expected an integer >= 1"):
        load_config(None, ["train.lora.enabled=true", "train.lora.rank=0"])
    assert not (tmp_path / "quickstart").exists()  # nothing ran


def test_the_batch_must_split_over_the_mesh_batch_shards():
    from recranker_jax.config_checks import check_batch, resolve_mesh_shape

    rules = {"batch": ["data", "fsdp"]}
    sizes = dict(zip(("data", "fsdp", "tensor"), resolve_mesh_shape([2, -1, 1], 8)))
    check_batch("train.batch_size", 8, rules, sizes)  # 2 x 4 shards
    with pytest.raises(RecRankerError, match=r"train.batch_size=12 must be a multiple of the 8 batch shards of the "
                                             r"mesh \(data=2, fsdp=4, tensor=1\)"):
        check_batch("train.batch_size", 12, rules, sizes)


# ----------------------------------------------------------------------------- config show / keys, help pages


def test_every_config_key_has_exactly_one_meaning():
    from recranker_jax.config_keys import KEYS, config_fields

    keys = [key for key, _, _ in config_fields()]
    assert len(keys) == len(set(keys))
    assert set(KEYS) == set(keys), set(KEYS) ^ set(keys)  # a new key needs its line; a removed one loses it
    assert all(text and "\n" not in text for text in KEYS.values())


def test_config_show_is_the_resolved_config_with_meanings_and_loads_back(tmp_path, capsys):
    import yaml

    from recranker_jax.config_keys import KEYS, leaf_keys

    overrides = ["data.min_likes=7", "prompts.templates.pairwise_question={hint}Prefer {first} to {second}? #1",
                 "mesh.rules.layers=[fsdp]"]
    assert main(["config", "show", *overrides]) == 0
    shown = capsys.readouterr().out
    expected = load_config("quickstart", overrides)
    assert yaml.safe_load(shown) == expected.to_dict()
    (tmp_path / "shown.yaml").write_text(shown)
    assert load_config(str(tmp_path / "shown.yaml")) == expected  # a config file as it is
    for key in leaf_keys():
        name = key.rsplit(".", 1)[-1]
        assert any(line.strip().startswith(f"{name}: ") and line.endswith(f"  # {KEYS[key]}")
                   for line in shown.splitlines()), key
    assert main(["config", "show", "data.min_likes=zero"]) == 2  # checked like any other command
    assert "data.min_likes" in capsys.readouterr().err


def test_config_keys_lists_every_key_with_its_type_default_and_meaning(capsys):
    from recranker_jax.config_keys import KEYS, leaf_keys

    assert main(["config", "keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for key in leaf_keys():
        matching = [line for line in lines if line.strip().startswith(f"{key} (")]
        assert len(matching) == 1 and matching[0].endswith(f": {KEYS[key]}"), key
    assert "  data.min_likes (int; default 4): " in "\n".join(lines)


def _subparsers(parser, path=()):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))


def test_every_help_page_has_a_description_line():
    from recranker_jax.cli import build_parser

    pages = dict(_subparsers(build_parser()))
    assert {("data",), ("plan",), ("report",), ("quickstart",), ("pipeline",), ("config", "show")} <= set(pages)
    missing = [" ".join(path) for path, parser in pages.items() if not parser.description]
    assert not missing, missing
    for path, parser in pages.items():
        assert parser.description.strip() in " ".join(parser.format_help().split()) or path == ()


def test_pipeline_shows_its_config_as_required(capsys):
    from recranker_jax.cli import build_parser

    parser = dict(_subparsers(build_parser()))[("pipeline",)]
    usage = parser.format_usage()
    assert " --config CONFIG" in usage and "[--config" not in usage
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "run.name=x"])
    assert exit_info.value.code == 2 and "--config" in capsys.readouterr().err
