"""Each task's answers placed into per-user, per-candidate arrays, on hand-made records."""

import numpy as np

from recranker_jax.rank import answers


def test_answers_land_in_their_candidates_columns_and_unscored_tasks_keep_defaults():
    cand = answers.candidate_matrix([[4, 7, 9], [2, 5]], n_users=3)
    assert cand.tolist() == [[4, 7, 9], [2, 5, -1], [-1, -1, -1]]
    assert answers.scored_users(cand, np.array([9, 3, 4]), only_hits=True).tolist() == [0]
    assert answers.scored_users(cand, np.array([9, 3, 4]), only_hits=False).tolist() == [0, 1]
    column = answers.candidate_columns(cand, [0, 1])
    assert column == {(0, 4): 0, (0, 7): 1, (0, 9): 2, (1, 2): 0, (1, 5): 1}

    point = [[{"_items": [9]}, {"_items": [4]}], [{"_items": [5]}]]
    pair = [[{"_items": [7, 9], "pair_index": 0}, {"_items": [9, 7], "pair_index": 0}],
            [{"_items": [2, 5], "pair_index": 1}, {"_items": [5, 2], "pair_index": 1}]]
    listed = [[{"_items": [9, 4, 7]}]]
    scored = {"pointwise": ([0, 1], point, [np.array([4.5, 2.0]), np.array([3.0])]),
              "pairwise": ([0, 1], pair, [np.array([1, 0], np.int8), np.array([1, 1], np.int8)]),
              "listwise": ([0], listed, [np.array([1, 0, 2])])}
    arrays = answers.answer_arrays(scored, column, n_users=3, k=3, n_pairs=2)
    assert list(arrays) == ["expected_rating", "pairs", "prefers_first", "list_positions"]
    assert arrays["expected_rating"].tolist() == [[2.0, 0.0, 4.5], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]
    assert arrays["pairs"].tolist() == [[[1, 2], [-1, -1]], [[-1, -1], [0, 1]], [[-1, -1], [-1, -1]]]
    assert arrays["prefers_first"].tolist() == [[[1, 0], [-1, -1]], [[-1, -1], [1, 1]], [[-1, -1], [-1, -1]]]
    assert arrays["list_positions"].tolist() == [[0, 2, 1], [0, 0, 0], [0, 0, 0]]
    assert answers.inconsistent_rate(arrays["pairs"], arrays["prefers_first"]) == 0.5  # user 1 said Yes twice

    empty = answers.answer_arrays({}, column, n_users=3, k=3, n_pairs=2)
    assert not empty["expected_rating"].any() and not empty["list_positions"].any()
    assert (empty["pairs"] == -1).all() and (empty["prefers_first"] == -1).all()
    assert answers.inconsistent_rate(empty["pairs"], empty["prefers_first"]) is None
