import json

import pytest

from recranker_jax.cli import main
from recranker_jax.errors import RecRankerError
from recranker_jax.pipeline import build_cached, finished_key


def test_stage_is_cached_by_key_and_rebuilt_when_key_changes(tmp_path):
    calls = []

    def build(out):
        calls.append(out.name)
        (out / "value.txt").write_text(str(len(calls)))

    out, cached = build_cached(tmp_path / "s", "k1", build)
    assert not cached and (out / "value.txt").read_text() == "1"
    _, cached = build_cached(tmp_path / "s", "k1", build)
    assert cached and len(calls) == 1
    _, cached = build_cached(tmp_path / "s", "k2", build)
    assert not cached and (out / "value.txt").read_text() == "2"
    assert finished_key(tmp_path / "s") == "k2"


def test_failed_stage_leaves_previous_output_intact(tmp_path):
    build_cached(tmp_path / "s", "k1", lambda out: (out / "value.txt").write_text("good"))

    def failing(out):
        (out / "value.txt").write_text("half-written")
        raise RecRankerError("boom")

    with pytest.raises(RecRankerError):
        build_cached(tmp_path / "s", "k2", failing)
    assert (tmp_path / "s" / "value.txt").read_text() == "good"
    assert finished_key(tmp_path / "s") == "k1"  # a later run with k1 is still a cache hit


def test_bad_source_fails_without_touching_existing_split(tmp_path, capsys):
    root = f"run.root={tmp_path}"
    assert main(["data", "split", root]) == 0
    before = (tmp_path / "quickstart" / "data" / "train.csv").read_bytes()
    rc = main(["data", "split", root, "data.source=ml-100k", f"data.path={tmp_path / 'missing'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing" in err
    assert (tmp_path / "quickstart" / "data" / "train.csv").read_bytes() == before


def test_cli_split_out_and_stats(tmp_path, capsys):
    root = f"run.root={tmp_path}"
    assert main(["data", "split", root, "--out", str(tmp_path / "export")]) == 0
    for name in ("train.csv", "valid.csv", "test.csv", "items.csv"):
        assert (tmp_path / "export" / name).read_bytes() == (tmp_path / "quickstart" / "data" / name).read_bytes()
    header = (tmp_path / "export" / "train.csv").read_text().splitlines()[0]
    assert header == "user_id,item_id,rating,timestamp"
    capsys.readouterr()
    assert main(["data", "stats", root, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["users"] == 671 and stats["items"] == 9066 and stats["ratings"] == 100004
    assert stats["test"] == stats["valid"] == stats["users_kept"] == 664
    assert stats["train_interactions"] + stats["valid"] + stats["test"] <= stats["ratings"]


def test_unknown_source_and_out_is_a_file(tmp_path, capsys):
    root = f"run.root={tmp_path}"
    assert main(["data", "stats", root, "data.source=netflix"]) == 2
    assert "unknown data.source 'netflix'; expected one of: movielens-small, ml-100k" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["data", "split", root, "--out", str(tmp_path / "afile")]) == 2
    assert "expected a folder, found a file" in capsys.readouterr().err


def test_quickstart_runs_every_stage_resumes_after_a_crash_then_reuses_them(tmp_path, capsys, monkeypatch):
    import recranker_jax.rank.stage as rank_stage

    fast = [f"run.root={tmp_path}", "retrieval.epochs=2", "retrieval.eval_every=1", "retrieval.dim=8",
            "retrieval.models=[lightgcn, explicit_mf]", "retrieval.explicit_mf.epochs=1", "retrieval.explicit_mf.eval_every=1",
            "sampling.size=50", "prompts.tokenizer_vocab_size=600", "train.steps=2", "train.batch_size=8",
            "model.hidden_size=16", "model.intermediate_size=32", "rank.splits=[test]", "rank.bootstrap=20"]
    build_ranking = rank_stage.build_ranking

    def crash(*args, **kwargs):
        raise RecRankerError("simulated crash in the rank stage")

    monkeypatch.setattr(rank_stage, "build_ranking", crash)
    assert main(["quickstart", *fast]) == 2
    out, err = capsys.readouterr()
    assert "[data] done" in out and "users_kept          664" in out
    assert "[retrieval] done" in out and "[instructions] done" in out and "[finetune] done" in out
    assert err.endswith("error: simulated crash in the rank stage\n")  # after the progress bars
    run = tmp_path / "quickstart"
    assert (run / "finetune" / "model" / "model.safetensors").is_file() and not (run / "ranking").exists()
    marker = (run / "finetune" / "_stage.json").read_text()

    monkeypatch.setattr(rank_stage, "build_ranking", build_ranking)
    assert main(["quickstart", *fast]) == 0  # resumes: the finished stages are reused
    out = capsys.readouterr().out
    assert "[data] cached" in out and "[retrieval] cached" in out and "[instructions] cached" in out
    assert "[finetune] cached" in out and "[rank] done" in out and "hybrid" in out
    assert "[verdict] test: " in out and "the LightGCN order" in out  # the quickstart ends with its verdict
    assert (run / "finetune" / "_stage.json").read_text() == marker
    assert not list((run / "checkpoints").glob("*"))  # finished stages keep no training state by default
    report = (run / "report.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    hr3 = metrics["splits"]["test"]["methods"]["backbone"]["metrics"]["hr@3"]
    assert f"{hr3:.4f}" in report
    assert (run / "plots" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["quickstart", *fast]) == 0
    assert "[rank] cached" in capsys.readouterr().out


def test_a_filter_that_leaves_no_users_is_exit_code_2(tmp_path, capsys):
    assert main(["data", "stats", f"run.root={tmp_path}", "data.min_likes=100000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.min_likes=100000 leaves no users") and err.count("\n") == 1
    assert not (tmp_path / "quickstart" / "data").exists()


def test_a_stage_key_covers_its_sections_and_everything_upstream_but_not_how_the_model_runs():
    from recranker_jax.config import load_config
    from recranker_jax.pipeline import STAGES, cache_key

    base = load_config("quickstart")
    keys = {name: cache_key(base, name) for name in STAGES}
    order = list(STAGES)
    for override, first_changed in (("data.min_likes=5", "data"), ("retrieval.dim=32", "retrieval"),
                                    ("prompts.hints=false", "instructions"), ("train.steps=7", "finetune"),
                                    ("rank.alphas=[1,0,0]", "rank"), ("run.seed=3", "retrieval"),
                                    ("rank.candidates=planted", "rank"), ("rank.baselines=[mf]", "rank")):
        changed = load_config("quickstart", [override])
        moved = [name for name in STAGES if cache_key(changed, name) != keys[name]]
        assert moved == order[order.index(first_changed):], override  # that stage and every one after it
    for execution in ("model.scan_layers=true", "model.attention=xla", "train.remat=full", "run.tensorboard=false",
                      "train.profile_steps=[3, 5]"):
        assert {name: cache_key(load_config("quickstart", [execution]), name) for name in STAGES} == keys, execution


def test_the_cli_offers_every_stage_of_the_table():
    from recranker_jax.cli import build_parser
    from recranker_jax.pipeline import STAGES

    parser = build_parser()
    for name in STAGES:  # each parses as a command with the common options
        args = parser.parse_args([name, "--config", "quickstart", "run.name=x"] if name != "data"
                                 else ["data", "split", "--config", "quickstart"])
        assert args.command == name and args.config == "quickstart"


def test_a_finished_stage_keeps_its_last_checkpoint_only_when_asked(tmp_path):
    from recranker_jax.pipeline import _drop_checkpoints

    for keep_last in (False, True):
        folder = tmp_path / f"finetune-{keep_last}"
        for step in ("50", "100", "150"):
            (folder / step).mkdir(parents=True)
        _drop_checkpoints(folder, keep_last)
        assert sorted(p.name for p in folder.glob("*")) == (["150"] if keep_last else [])
