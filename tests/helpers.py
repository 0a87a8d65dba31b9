"""Small synthetic datasets built through the real data pipeline, for fast tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recranker_jax.data.split import SplitData, load_split, split_interactions, write_split
from recranker_jax.data.table import build_interactions


def synthetic_ratings(n_users: int = 48, n_items: int = 80, per_user: int = 25, seed: int = 0) -> pd.DataFrame:
    """Users with taste clusters (so models can learn something), 1-5 ratings, timestamps."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(n_users):
        cluster = user % 4
        preferred = np.arange(n_items)[np.arange(n_items) % 4 == cluster]
        chosen = rng.choice(n_items, size=per_user, replace=False)
        for t, item in enumerate(chosen):
            rating = rng.choice([4, 5]) if item in preferred else rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.3, 0.1])
            rows.append((user + 1, item + 1, rating, 1000 + 10 * t))
    return pd.DataFrame(rows, columns=["user", "item", "rating", "ts"])


def synthetic_ml100k(folder: Path, **sizes: int) -> Path:
    """`synthetic_ratings` as a GroupLens ml-100k folder (u.data, u.item), for data.source=ml-100k."""
    frame = synthetic_ratings(**sizes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in frame.itertuples(index=False)))
    genres = "|".join(["0"] * 8 + ["1"] + ["0"] * 10)  # Drama
    items = sorted(frame["item"].unique())
    (folder / "u.item").write_text("".join(f"{i}|Movie {i} (2000)|01-Jan-2000||http://x|{genres}\n" for i in items))
    return folder


def synthetic_split(out_dir: Path, n_users: int = 48, n_items: int = 80, per_user: int = 25, seed: int = 0) -> SplitData:
    """`synthetic_ratings` split and written as the data stage writes it."""
    frame = synthetic_ratings(n_users, n_items, per_user, seed)
    meta = pd.DataFrame({"item_id": np.arange(1, n_items + 1), "title": [f"Movie {i}" for i in range(1, n_items + 1)],
                         "year": 2000, "genres": "Drama"})
    interactions = build_interactions(
        user_raw=frame["user"], item_raw=frame["item"], rating=frame["rating"].to_numpy(),
        timestamp=frame["ts"].to_numpy(), item_meta=meta, name="synthetic", scale=(1.0, 5.0), item_noun="movie",
    )
    write_split(split_interactions(interactions, 4, 2, 4), out_dir)
    return load_split(out_dir)
