"""`recranker bench compare`: result files side by side, ratios to the first, '-' for gaps."""

import json

import pytest

from recranker_jax.bench.compare import compare, format_comparison, load_result
from recranker_jax.cli import main
from recranker_jax.errors import RecRankerError


def write(path, kind, count, results):
    doc = {"environment": {"device_kind": kind, "device_count": count, "jax": "0.10.2"}, "results": results}
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def files(tmp_path):
    a = write(tmp_path / "v5e.json", "TPU v5 lite", 8, {
        "finetune": {"tokens_per_second": 4000.0, "mfu": 0.4, "backend": "tpu"},
        "retrieval": {"epoch_seconds": 2.0},
    })
    b = write(tmp_path / "h100.json", "NVIDIA H100 80GB HBM3", 8, {
        "finetune": {"tokens_per_second": 10000.0, "mfu": 0.3},
        "rank": {"items_per_second": 250.0},
    })
    return a, b


def test_rows_values_and_ratios(files):
    labels, rows = compare([load_result(p) for p in files])
    assert labels == ["TPU v5 lite x8", "NVIDIA H100 80GB HBM3 x8"]
    table = {key: (values, ratios) for key, values, ratios in rows}
    assert list(table) == ["finetune.tokens_per_second", "finetune.mfu", "retrieval.epoch_seconds",
                           "rank.items_per_second"]  # strings are skipped; order of first appearance
    assert table["finetune.tokens_per_second"] == ([4000.0, 10000.0], [1.0, 10000.0 / 4000.0])
    values, ratios = table["finetune.mfu"]
    assert values == [0.4, 0.3] and ratios[1] == pytest.approx(0.3 / 0.4)
    assert table["retrieval.epoch_seconds"] == ([2.0, None], [1.0, None])
    assert table["rank.items_per_second"] == ([None, 250.0], [None, None])


def test_printed_table(files, capsys):
    assert main(["bench", "compare", *map(str, files)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "TPU v5 lite x8" in out[0] and "NVIDIA H100 80GB HBM3 x8 (/first)" in out[0]
    row = next(line for line in out if line.startswith("finetune.tokens_per_second"))
    assert row.split() == ["finetune.tokens_per_second", "4,000", "10,000", "(x2.50)"]
    row = next(line for line in out if line.startswith("finetune.mfu"))
    assert row.split() == ["finetune.mfu", "0.4", "0.3", "(x0.75)"]
    assert next(line for line in out if line.startswith("retrieval.epoch_seconds")).split() == [
        "retrieval.epoch_seconds", "2", "-"]
    assert next(line for line in out if line.startswith("rank.items_per_second")).split() == [
        "rank.items_per_second", "-", "250"]


def test_same_machine_twice_is_told_apart_by_file_name(files):
    text = format_comparison([files[0], files[0]])
    assert "TPU v5 lite x8 (v5e)" in text and "(x1.00)" in text


@pytest.mark.parametrize("content, why", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "the top level is not an object"),
    ('{"results": {}}', "no 'environment' object"),
    ('{"environment": {}, "results": {"a": 3}}', "'results' is not an object"),
])
def test_a_file_that_is_not_a_result_names_the_file(tmp_path, content, why, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(RecRankerError, match=why) as err:
        load_result(bad)
    assert str(bad) in str(err.value)
    assert main(["bench", "compare", str(bad)]) == 2
    assert f"bench result {bad}" in capsys.readouterr().err


def test_missing_file(tmp_path):
    with pytest.raises(RecRankerError, match="missing.json: file not found"):
        load_result(tmp_path / "missing.json")


def test_a_retrieval_bench_file_is_a_result_file(tmp_path):
    """`bench retrieval --out` writes the schema compare reads (it used to write 'machine')."""
    import jax

    from recranker_jax.bench.compare import label
    from recranker_jax.bench.retrieval import bench_retrieval
    from recranker_jax.config import load_config

    doc = bench_retrieval(load_config("quickstart", [f"run.root={tmp_path}"]), variants=())
    path = tmp_path / "retrieval.json"
    path.write_text(json.dumps(doc))
    assert label(load_result(path)) == f"{jax.devices()[0].device_kind} x{jax.device_count()}"


def test_the_plot_pairs_the_sides_and_is_written_beside_the_table(files, tmp_path, capsys):
    from recranker_jax.bench.compare import panels

    sides = write(tmp_path / "cpu.json", "cpu", 1, {
        "train/quickstart": {"jax_tokens_per_second": 20000.0, "torch_tokens_per_second": 14000.0, "ratio": 1.43},
        "retrieval/quickstart/jax-edges": {"epoch_seconds": 0.2}, "retrieval/quickstart/torch-sparse": {"epoch_seconds": 1.4}})
    labels, rows = compare([load_result(p) for p in (sides, files[0])])
    grouped = panels(labels, rows)
    assert grouped["train/quickstart.tokens_per_second"] == [("cpu x1", "JAX", 20000.0), ("cpu x1", "PyTorch", 14000.0)]
    assert grouped["train/quickstart.ratio"] == [("cpu x1", "", 1.43)]
    assert grouped["retrieval/quickstart.epoch_seconds"] == [("cpu x1", "jax-edges", 0.2), ("cpu x1", "torch-sparse", 1.4)]
    assert grouped["finetune.tokens_per_second"] == [("TPU v5 lite x8", "", 4000.0)]  # a gap draws no bar
    assert main(["bench", "compare", *map(str, files)]) == 0
    png = files[0].with_name("v5e-compare.png")
    assert capsys.readouterr().out.rstrip().endswith(f"plot written to {png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "compare", str(sides), "--plot", str(tmp_path / "out" / "sides.png")]) == 0
    assert (tmp_path / "out" / "sides.png").stat().st_size > 1000
