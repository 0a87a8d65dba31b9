"""The task scorers (on the KV-cache engine, llm/decode.py) against plain full-sequence
computations on a tiny random LLaMA, and the parsing of generated text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recranker_jax.errors import RecRankerError
from recranker_jax.llm.llama import Llama, LlamaConfig
from recranker_jax.prompts.tokenizer import train_bpe
from recranker_jax.rank import scorers

TITLES = ['"Toy Story (1995)"', '"Heat (1995)"', '"Jumanji (1995)"', '"Casino (1995)"', '"Sabrina (1995)"']


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [f"User history:\n{t}: {r}\n{u}: {5 - r}\nTarget movie: {t}\nAnswer: {r}" for r, (t, u) in
              enumerate(zip(TITLES, TITLES[::-1]), 1)] * 5 + ["Would the user prefer A over B? Answer: Yes No"]
    return train_bpe(corpus, 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tokenizer):
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return Llama(cfg, nnx.Rngs(11))


@nnx.jit
def _forward(model, tokens):
    return jax.nn.log_softmax(model(tokens)[0].astype(jnp.float32), axis=-1)


def full_logprobs(model, ids):
    """Log-probabilities after each token of one unpadded sequence (end-padded to 96 tokens, which
    causal attention never lets earlier positions see, so one compilation serves every length)."""
    assert len(ids) <= 96
    return np.asarray(_forward(model, jnp.asarray(list(ids) + [0] * (96 - len(ids)))[None]))[: len(ids)]


def test_split_prompts_concatenates_to_each_prompts_own_tokens(tokenizer):
    prefix = "User history:\n" + "\n".join(f"{t}: 4" for t in TITLES[:3]) + "\n"
    prompts = [prefix + f"Target movie: {t}\nAnswer:" for t in TITLES]
    group = scorers.split_prompts(tokenizer, prompts, len(prefix))
    assert len(group.prefix) > 10
    for prompt, suffix in zip(prompts, group.suffixes):
        assert group.prefix + suffix == tokenizer(prompt)["input_ids"]
    cached, full = scorers.token_counts([group, group])
    assert full == 2 * sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert cached == 2 * (len(tokenizer(prompts[0][: len(prefix)])["input_ids"]) + sum(map(len, group.suffixes)))


def test_prefix_cached_scores_equal_full_sequence_scores(tokenizer, model):
    groups, wanted = [], []
    for user, history in enumerate([TITLES[:1], TITLES[:4], TITLES[1:3]]):
        prefix = "User history:\n" + "\n".join(f"{t}: {1 + user}" for t in history) + "\n"
        prompts = [prefix + f"Target movie: {t}\nAnswer:" for t in TITLES[user:]]
        group = scorers.split_prompts(tokenizer, prompts, len(prefix))
        groups.append(group)
        wanted.extend(full_logprobs(model, group.prefix + s + [7])[-1] for s in group.suffixes)
    # Two users per batch: the second batch is padded with an empty user row.
    answers = scorers.AnswerTokens(lead=[7], choices=np.array([8], np.int32))
    got = scorers.answer_logprobs(model, groups, answers, users_per_batch=2)
    assert len(got) == len(wanted) == 5 + 4 + 3
    np.testing.assert_allclose(got, np.stack(wanted), atol=2e-5)


def test_expected_rating_and_pairwise_preference_from_answer_tokens(tokenizer):
    answers = scorers.answer_tokens(tokenizer, ["1", "2", "3", "4", "5"])
    assert len(set(answers.choices.tolist())) == 5
    logprobs = np.full((2, len(tokenizer)), -50.0)
    logprobs[0, answers.choices] = np.log([0.1, 0.1, 0.2, 0.3, 0.3])
    logprobs[1, answers.choices[4]] = 0.0
    np.testing.assert_allclose(scorers.expected_ratings(logprobs, answers), [3.6, 5.0], atol=1e-9)
    yes_no = scorers.answer_tokens(tokenizer, ["Yes", "No"])
    logprobs[:, yes_no.choices] = [[-1.0, -2.0], [-3.0, -0.5]]
    assert scorers.prefers_first(logprobs, yes_no).tolist() == [1, 0]


def test_a_tokenizer_that_cannot_separate_the_answers_is_refused():
    class DigitTokenizer:  # LLaMA-style digits: " 10" starts with the token of " 1"
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    with pytest.raises(RecRankerError, match="cannot tell the answers '1', '10' apart"):
        scorers.answer_tokens(DigitTokenizer(), [str(r) for r in range(1, 11)])


def reference_listwise(model, context, pieces, top):
    """Brute force: at each step, score every remaining title by a full forward pass."""
    chosen, sequence = [], list(context)
    for step in range(top):
        best, best_score = None, -np.inf
        for j in range(len(pieces[0])):
            if j in chosen:
                continue
            piece = pieces[0 if step == 0 else 1][j]
            logprobs = full_logprobs(model, sequence + piece)
            score = sum(logprobs[len(sequence) - 1 + i, token] for i, token in enumerate(piece))
            if score > best_score:
                best, best_score = j, score
        chosen.append(best)
        sequence += pieces[0 if step == 0 else 1][best]
    return chosen


def test_constrained_listwise_decoding_matches_brute_force_and_is_a_ranking(tokenizer, model):
    rng = np.random.default_rng(0)
    contexts, pieces = [], []
    for user in range(3):
        shown = [TITLES[i] for i in rng.permutation(5)]
        prompt = "Candidates:\n" + "\n".join(shown[: 3 + user]) + "\nAnswer:"
        contexts.append(tokenizer(prompt)["input_ids"])
        pieces.append([[scorers.continuation_ids(tokenizer, "Answer:", " " + t) for t in shown],
                       [scorers.continuation_ids(tokenizer, TITLES[0], "\n" + t) for t in shown]])
    positions = scorers.listwise_rankings(model, contexts, pieces, top=3, users_per_batch=2)
    for user in range(3):
        assert sorted(positions[user][positions[user] > 0].tolist()) == [1, 2, 3]
        order = [int(np.flatnonzero(positions[user] == p)[0]) for p in (1, 2, 3)]
        assert order == reference_listwise(model, contexts[user], pieces[user], 3)


def test_a_user_with_fewer_candidates_than_places_ranks_them_all_and_nothing_more(tokenizer, model):
    """k differs between users: the short list is ranked in full (brute-force order) and its
    empty places stay 0, while the other user in the batch ranks its own top places."""
    contexts, pieces = [], []
    for shown in (TITLES, TITLES[3:]):  # 5 candidates, then 2
        contexts.append(tokenizer("Candidates:\n" + "\n".join(shown) + "\nAnswer:")["input_ids"])
        pieces.append([[scorers.continuation_ids(tokenizer, "Answer:", " " + t) for t in shown],
                       [scorers.continuation_ids(tokenizer, TITLES[0], "\n" + t) for t in shown]])
    positions = scorers.listwise_rankings(model, contexts, pieces, top=3, users_per_batch=2, progress=False)
    assert positions.shape == (2, 5)
    assert sorted(positions[0][positions[0] > 0].tolist()) == [1, 2, 3]
    assert positions[1, 2:].tolist() == [0, 0, 0]
    order = [int(np.flatnonzero(positions[1] == p)[0]) for p in (1, 2)]
    assert order == reference_listwise(model, contexts[1], pieces[1], 2)


@pytest.mark.parametrize(("text", "rating"), [(" 4", 4.0), ("4 stars", 4.0), (" seven", None), (" 9", None), ("", None)])
def test_parse_rating(text, rating):
    assert scorers.parse_rating(text, 5) == rating


def test_parse_yes_no_and_ranking():
    assert [scorers.parse_yes_no(t) for t in (" Yes", "no.", " maybe", "")] == [1, 0, -1, -1]
    text = ' "Heat (1995)"\nsomething else\n"Toy Story (1995)"\n"Heat (1995)"'
    assert scorers.parse_ranking(text, TITLES, 5).tolist() == [2, 1, 0, 0, 0]
    assert scorers.parse_ranking("nothing", TITLES, 5) is None
