"""A config file is read strictly: a repeated key in any mapping (block or flow) and an empty
file are errors naming the file and line; YAML merge keys may still be overridden beside them."""

import pytest

from recranker_jax.config import load_config, read_yaml
from recranker_jax.errors import RecRankerError


@pytest.mark.parametrize("text, message", [
    ("train:\n  steps: 5\n  lr: 1.0e-3\n  steps: 7\n", "line 4: duplicate key 'steps' (first on line 2); keep one"),
    ("train: {steps: 1, steps: 2}\n", "line 1: duplicate key 'steps' (first on line 1)"),
    ("train:\n  steps: 5\nrank:\n  ks: [3]\ntrain:\n  lr: 1.0\n", "line 5: duplicate key 'train' (first on line 1)"),
    ("", "line 1: the file is empty (or only comments)"),
    ("# only a comment\n\n", "line 1: the file is empty (or only comments)"),
])
def test_a_repeated_key_or_an_empty_file_is_refused_with_its_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(RecRankerError) as err:
        load_config(path)
    assert str(err.value).startswith(f"config file {path} {message}")


def test_a_merge_key_is_not_a_repeat(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    assert read_yaml(path) == {"base": {"x": 1, "y": 2}, "other": {"x": 3, "y": 2}}
