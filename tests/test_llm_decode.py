"""The KV-cache engine's host-side pieces (widths, packing) and batched, padded greedy generation
against one prompt at a time. (Cached branch log-probabilities against full-sequence ones:
test_rank_scorers.py, through the scorers; the branches themselves: test_llm_branches.py.)"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recranker_jax.llm import decode
from recranker_jax.llm.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return Llama(cfg, nnx.Rngs(11))


def test_widths_are_a_few_buckets_with_at_most_half_again_of_padding():
    assert [decode.bucket_width(n) for n in (1, 32, 33, 48, 49, 64, 65, 97, 129, 193)] == [
        32, 32, 48, 48, 64, 64, 96, 128, 192, 256]
    assert [decode.round_up(n, 8) for n in (0, 1, 8, 9)] == [8, 8, 8, 16]


def test_branches_are_packed_one_after_another():
    packed = decode.pack_branches([[[1, 2], [], [3]], [[4]]], width=5, batch=3, slots=3)
    assert packed["tokens"].tolist() == [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0], [0] * 5]
    assert packed["branch_ids"].tolist() == [[0, 0, 2, -1, -1], [0, -1, -1, -1, -1], [-1] * 5]
    assert packed["within"].tolist() == [[0, 1, 0, 0, 0], [0] * 5, [0] * 5]
    assert packed["offsets"].tolist() == [[0, 2, 2], [0, 0, 0], [0, 0, 0]]
    assert packed["lengths"].tolist() == [[2, 0, 1], [1, 0, 0], [0, 0, 0]]


def test_batched_generation_equals_one_prompt_at_a_time(model):
    prompts = [[5, 9, 13, 2, 7], [3, 4], [8, 8, 8, 1, 2, 3, 4, 6, 9]]
    got = decode.generate(model, prompts, max_tokens=6, eos=-1, batch_size=2)
    for prompt, tokens in zip(prompts, got):
        want = np.asarray(decode.greedy_generate(model, jnp.asarray(prompt)[None], 6))[0].tolist()
        assert tokens == want
