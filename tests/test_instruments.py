"""TensorBoard event files, profiler traces and the memory scalar of the training stages
(instruments.py): read back with TensorBoard's own reader and compared with the run's logs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from recranker_jax.cli import main
from recranker_jax.errors import RecRankerError

FAST = ["retrieval.epochs=2", "retrieval.eval_every=1", "retrieval.dim=8",
        "retrieval.models=[lightgcn, explicit_mf]", "retrieval.explicit_mf.epochs=1", "retrieval.explicit_mf.eval_every=1",
        "sampling.size=50", "prompts.tokenizer_vocab_size=600", "train.steps=4", "train.batch_size=8",
        "model.hidden_size=16", "model.intermediate_size=32"]


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the event files in `folder`, read by TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A quickstart-like run up to the finetune, with steps 2 and 3 of the finetune traced."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["finetune", f"run.root={root}", *FAST, "--profile", "2:4"]) == 0
    return root / "quickstart"


def test_the_finetune_events_hold_the_train_log(finished_run):
    log = [json.loads(line) for line in (finished_run / "finetune" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    tags = scalars(finished_run / "finetune" / "tensorboard")
    for name in ("loss", "tokens_per_second", "learning_rate", "grad_norm"):
        assert [step for step, _ in tags[f"train/{name}"]] == [1, 2, 3, 4], name
        assert [value for _, value in tags[f"train/{name}"]] == pytest.approx([e[name] for e in log], rel=1e-6), name
    assert [step for step, _ in tags["train/step_seconds"]] == [1, 2, 3, 4]
    assert all(value > 0 for _, value in tags["train/step_seconds"])
    # the memory beside tokens/s: the CPU reports no device memory, so the process's peak RSS
    assert all(value > 2**20 for _, value in tags["train/host_peak_rss_bytes"])
    assert "train/mfu" not in tags  # the CPU's peak is unknown: no MFU, as in train_log.jsonl


def test_the_retrieval_events_hold_each_backbone_s_history(finished_run):
    history = json.loads((finished_run / "retrieval" / "history.json").read_text())
    for name in ("lightgcn", "explicit_mf"):
        tags = scalars(finished_run / "retrieval" / "tensorboard" / name)
        for key in history[name][0]:
            if key != "epoch":
                assert tags[f"retrieval/{key.replace('@', '_')}"] == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in history[name]]
        assert [step for step, _ in tags["retrieval/epoch_seconds"]] == [r["epoch"] for r in history[name]]
    assert "retrieval/valid_ndcg_10" in scalars(finished_run / "retrieval" / "tensorboard" / "lightgcn")


def test_the_profile_holds_the_compiled_train_step(finished_run):
    folder = finished_run / "finetune" / "profile"
    traces = list(folder.glob("plugins/profile/*/*.xplane.pb"))  # the layout TensorBoard's profile plugin reads
    assert len(traces) == 1
    # the jitted step (train/step.py `_update` under nnx.jit) ran while tracing: its XLA program is named in it
    assert b"jit__update" in traces[0].read_bytes()
    assert not list((finished_run / "retrieval").glob("profile"))  # only the stages asked for


def test_instrument_folders_are_outside_the_manifest_and_the_stages_stay_cached(finished_run, capsys):
    marker = json.loads((finished_run / "finetune" / "_stage.json").read_text())
    assert marker["files"] and not [f for f in marker["files"] if f.startswith(("tensorboard", "profile"))]
    retrieval = json.loads((finished_run / "retrieval" / "_stage.json").read_text())
    assert not [f for f in retrieval["files"] if f.startswith("tensorboard")]
    # profiling and TensorBoard are execution settings: the same run with them changed is all cached
    capsys.readouterr()
    assert main(["finetune", f"run.root={finished_run.parent}", *FAST, "run.tensorboard=false",
                 "train.profile_steps=[1, 2]"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[finetune] cached")


def test_tensorboard_off_writes_no_event_files(tmp_path):
    from recranker_jax.config import load_config
    from recranker_jax.pipeline import STAGES, cache_key

    on, off = load_config("quickstart"), load_config("quickstart", ["run.tensorboard=false"])
    assert {name: cache_key(on, name) for name in STAGES} == {name: cache_key(off, name) for name in STAGES}
    assert main(["retrieval", f"run.root={tmp_path}", *FAST, "run.tensorboard=false"]) == 0
    assert not (tmp_path / "quickstart" / "retrieval" / "tensorboard").exists()


def test_a_profile_of_steps_past_the_end_is_closed_with_the_training(tmp_path):
    from recranker_jax.instruments import Scalars, StepProfiler

    profiler = StepProfiler(tmp_path / "profile", [1, 99])
    profiler.before(1)
    assert profiler.active
    profiler.after(1)
    assert profiler.active  # steps 2 .. 98 still to come
    profiler.close()
    assert not profiler.active and list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
    off = StepProfiler(tmp_path / "off", [])
    off.before(1)
    assert not off.active and not (tmp_path / "off").exists()
    unused = Scalars(tmp_path / "tb", "train", enabled=False)
    unused.write(1, {"loss": 1.0})
    unused.close()
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("text", ["3", "3:x", "0:2", "5:5", "4:2", ":"])
def test_bad_profile_steps_are_one_line_errors(text, capsys):
    from recranker_jax.config_checks import parse_profile_steps

    with pytest.raises(RecRankerError, match="--profile"):
        parse_profile_steps(text)
    assert main(["finetune", "--profile", text]) == 2
    assert capsys.readouterr().err.startswith("error: --profile")
    assert parse_profile_steps("3:5") == [3, 5]


def test_profile_steps_in_the_config_are_checked():
    from recranker_jax.config import load_config

    with pytest.raises(RecRankerError, match=r"train.profile_steps=\[3\]"):
        load_config("quickstart", ["train.profile_steps=[3]"]).validate()
    assert load_config("quickstart", ["train.profile_steps=[3, 5]"]).validate().train.profile_steps == [3, 5]


def test_the_manifest_check_skips_instrument_folders_only(tmp_path):
    from recranker_jax.run import damage, read_marker, write_marker

    (tmp_path / "model.txt").write_text("weights")
    write_marker(tmp_path, "key", 1.0, "0", {}, {})
    for folder in ("tensorboard", "profile"):  # written again at every run: never damage
        (tmp_path / folder / "sub").mkdir(parents=True)
        (tmp_path / folder / "sub" / "events").write_text("new")
    assert damage(tmp_path, read_marker(tmp_path)) is None
    (tmp_path / "tensorboard.txt").write_text("a result file named like one")
    assert damage(tmp_path, read_marker(tmp_path)).endswith("tensorboard.txt was added after the stage finished")
