import json

import jax.numpy as jnp
import numpy as np
import pytest

from recranker_jax.errors import RecRankerError
from recranker_jax.llm.hf_import import load_hf_llama

torch = pytest.importorskip("torch", reason="the PyTorch reference needs the test extra")
transformers = pytest.importorskip("transformers")


def save_tiny_llama(folder, tie=False, seed=0, rope=None):
    """A randomly initialised transformers LLaMA with GQA and 3 layers, saved as safetensors."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=112, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=5000.0, max_position_embeddings=64,
        tie_word_embeddings=tie, **({"rope_parameters": rope} if rope else {}),
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mistake in their import would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_imported_model_gives_torch_logits(tmp_path, tie, scan_layers):
    reference = save_tiny_llama(tmp_path, tie=tie)
    model = load_hf_llama(tmp_path, scan_layers=scan_layers)
    tokens = np.random.default_rng(0).integers(0, 97, (2, 17))
    with torch.no_grad():
        want = reference(torch.from_numpy(tokens)).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_packed_segments_do_not_attend_across_examples(tmp_path):
    save_tiny_llama(tmp_path)
    model = load_hf_llama(tmp_path)
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 97, 7), rng.integers(0, 97, 9)
    packed = jnp.asarray(np.concatenate([first, second]))[None]
    segments = jnp.asarray([0] * 7 + [1] * 9)[None]
    positions = jnp.asarray(list(range(7)) + list(range(9)))[None]
    logits = np.asarray(model(packed, positions, segments))[0]
    alone = np.asarray(model(jnp.asarray(second)[None]))[0]
    np.testing.assert_allclose(logits[7:], alone, atol=1e-5)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(RecRankerError, match="config.json not found"):
        load_hf_llama(tmp_path)
    save_tiny_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(RecRankerError, match="model_type 'mistral' is not supported"):
        load_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(RecRankerError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \[112, 48\], expected \[100, 48\]"):
        load_hf_llama(tmp_path)


def test_greedy_generation_with_the_kv_cache_matches_transformers(tmp_path):
    from recranker_jax.llm.decode import greedy_generate

    reference = save_tiny_llama(tmp_path, seed=3)
    model = load_hf_llama(tmp_path)
    prompt = np.random.default_rng(2).integers(3, 97, (2, 9))
    with torch.no_grad():
        want = reference.generate(torch.from_numpy(prompt), max_new_tokens=20, do_sample=False,
                                  min_new_tokens=20, pad_token_id=0)[:, 9:].numpy()
    got = np.asarray(greedy_generate(model, jnp.asarray(prompt), 20))
    np.testing.assert_array_equal(got, want)


def test_a_cached_shared_prefix_gives_the_full_sequence_logits(tmp_path):
    from recranker_jax.llm.llama import KVCache

    save_tiny_llama(tmp_path)
    model = load_hf_llama(tmp_path)
    rng = np.random.default_rng(5)
    prefix, suffixes = rng.integers(0, 97, (1, 11)), rng.integers(0, 97, (4, 6))
    cache = KVCache.zeros(model.config, 1, 17)
    _, cache = model.extend(jnp.asarray(prefix), cache, 0)
    logits, _ = model.extend(jnp.asarray(suffixes), cache.repeat(4), 11)
    full = model(jnp.asarray(np.concatenate([np.repeat(prefix, 4, 0), suffixes], axis=1)))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full)[:, 11:], atol=1e-5)


@pytest.mark.parametrize(("tie", "scan_layers"), [(False, True), (True, False)])
def test_exported_folder_loads_in_transformers_with_equal_logits(tmp_path, tie, scan_layers):
    from flax import nnx

    from recranker_jax.llm.hf_export import export_hf
    from recranker_jax.llm.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=2000.0, tie_word_embeddings=tie)
    model = Llama(cfg, nnx.Rngs(7), scan_layers=scan_layers)  # trained-from-scratch shape: random JAX weights
    export_hf(model, tmp_path / "out")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = np.random.default_rng(3).integers(0, 61, (2, 13))
    with torch.no_grad():
        want = reloaded(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), want, atol=1e-4, rtol=1e-4)
    round_trip = load_hf_llama(tmp_path / "out", scan_layers=not scan_layers)  # either layout reads it
    np.testing.assert_allclose(np.asarray(round_trip(jnp.asarray(tokens))), np.asarray(model(jnp.asarray(tokens))), atol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_import_onto_a_mesh_places_each_tensor_in_its_sharding(tmp_path, scan_layers):
    from flax import nnx

    from recranker_jax.config import MeshConfig
    from recranker_jax.parallel import logical_spec, make_mesh

    save_tiny_llama(tmp_path)
    mesh_cfg = MeshConfig(shape=[2, 2, 2])
    mesh = make_mesh(mesh_cfg)
    sharded = load_hf_llama(tmp_path, mesh=mesh, rules=mesh_cfg.rules, scan_layers=scan_layers)
    plain = load_hf_llama(tmp_path, scan_layers=False)
    want = np.asarray(plain.layers[1].self_attn.q_proj.kernel.get_value())
    if scan_layers:  # one stacked kernel [layers, embed, heads]; the layers axis is not split
        q = sharded.layers.self_attn.q_proj.kernel.get_value()
        assert q.sharding.spec == logical_spec(("layers", "embed", "heads"), mesh_cfg.rules)
        assert {shard.data.shape for shard in q.addressable_shards} == {(3, 24, 24)}
        np.testing.assert_array_equal(np.asarray(q)[1], want)
    else:
        q = sharded.layers[1].self_attn.q_proj.kernel.get_value()
        assert q.sharding.spec == logical_spec(("embed", "heads"), mesh_cfg.rules)
        # Each device holds only its block: [48 / fsdp 2, 48 / tensor 2].
        assert {shard.data.shape for shard in q.addressable_shards} == {(24, 24)}
        np.testing.assert_array_equal(np.asarray(q), want)
    # A vocabulary of 97 does not split over 2 tensor shards: that dimension stays whole.
    assert tuple(sharded.embed_tokens.embedding.get_value().sharding.spec) == (None, "fsdp")
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 97, (2, 9)))
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, t: m(t))(sharded, tokens)), np.asarray(plain(tokens)), atol=1e-5)


def test_bfloat16_parameters_and_compute_stay_close_to_float32(tmp_path):
    reference = save_tiny_llama(tmp_path)
    model = load_hf_llama(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    assert model.layers.mlp.up_proj.kernel.get_value().dtype == jnp.bfloat16
    tokens = np.random.default_rng(0).integers(0, 97, (2, 17))
    got = model(jnp.asarray(tokens))
    assert got.dtype == jnp.bfloat16
    with torch.no_grad():
        want = reference(torch.from_numpy(tokens)).logits.numpy()
    got = np.asarray(got.astype(jnp.float32))
    # bfloat16 keeps 8 bits of mantissa: logits within a few percent of their spread.
    assert np.abs(got - want).max() < 0.05 * (want.max() - want.min())
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.8


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_remat_policy_gives_the_same_gradients(scan_layers):
    import jax
    from flax import nnx

    from recranker_jax.llm.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 12)))

    def grads(remat):
        model = Llama(cfg, nnx.Rngs(3), remat=remat, scan_layers=scan_layers)
        loss = lambda m: jnp.mean(m(tokens) ** 2)  # noqa: E731
        return nnx.state(nnx.grad(loss)(model), nnx.Param)

    want = jax.tree.leaves(grads("none"))
    for policy in ("minimal", "dots", "full"):
        for a, b in zip(want, jax.tree.leaves(grads(policy))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_padded_cache_batches_give_each_rows_own_logits(tmp_path):
    """Left-padded prefixes of different lengths and right-padded continuations in one cached
    batch: every real token's logits equal running that row alone, unpadded."""
    from recranker_jax.llm.llama import KVCache

    save_tiny_llama(tmp_path)
    model = load_hf_llama(tmp_path)
    rng = np.random.default_rng(6)
    prefixes = [rng.integers(1, 97, n) for n in (5, 9)]
    suffixes = [rng.integers(1, 97, n) for n in (4, 2)]
    width, tail = 9, 4
    tokens = np.zeros((2, width), np.int32)
    valid = np.zeros((2, width + tail), bool)
    positions = np.zeros((2, width), np.int32)
    for row, prefix in enumerate(prefixes):
        pad = width - len(prefix)
        tokens[row, pad:] = prefix
        valid[row, pad:width] = True
        positions[row, pad:] = np.arange(len(prefix))
    cache = KVCache.zeros(model.config, 2, width + tail)
    prefix_logits, cache = model.extend(jnp.asarray(tokens), cache, 0, jnp.asarray(positions), jnp.asarray(valid))
    cont = np.zeros((2, tail), np.int32)
    cont_positions = np.zeros((2, tail), np.int32)
    for row, suffix in enumerate(suffixes):
        cont[row, : len(suffix)] = suffix
        valid[row, width : width + len(suffix)] = True
        cont_positions[row] = len(prefixes[row]) + np.arange(tail)
    logits, _ = model.extend(jnp.asarray(cont), cache, width, jnp.asarray(cont_positions), jnp.asarray(valid))
    for row in range(2):
        alone = np.asarray(model(jnp.asarray(np.concatenate([prefixes[row], suffixes[row]]))[None]))[0]
        n = len(prefixes[row])
        np.testing.assert_allclose(np.asarray(prefix_logits)[row, width - n :], alone[:n], atol=1e-5)
        np.testing.assert_allclose(np.asarray(logits)[row, : len(suffixes[row])], alone[n:], atol=1e-5)


def test_long_packed_sequences_match_torch_across_attention_blocks(tmp_path):
    """Over 128 tokens the causal attention runs block by block: still torch's logits, and packed
    examples still never see each other."""
    reference = save_tiny_llama(tmp_path)
    model = load_hf_llama(tmp_path)
    rng = np.random.default_rng(8)
    first, second = rng.integers(0, 97, 150), rng.integers(0, 97, 170)
    with torch.no_grad():
        want = reference(torch.from_numpy(second)[None]).logits.numpy()[0]
    packed = jnp.asarray(np.concatenate([first, second]))[None]
    segments = jnp.asarray([1] * 150 + [2] * 170)[None]
    positions = jnp.asarray(list(range(150)) + list(range(170)))[None]
    got = np.asarray(model(packed, positions, segments))[0, 150:]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_linear_rope_scaling_matches_torch_and_survives_export(tmp_path):
    from recranker_jax.llm.hf_export import export_hf

    reference = save_tiny_llama(tmp_path / "in", rope={"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0})
    model = load_hf_llama(tmp_path / "in")
    assert model.config.rope_scaling_factor == 4.0
    tokens = np.random.default_rng(9).integers(0, 97, (1, 40))
    with torch.no_grad():
        want = reference(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), want, atol=1e-4, rtol=1e-4)
    export_hf(model, tmp_path / "out")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.from_numpy(tokens)).logits.numpy(), want, atol=1e-5)
    config = json.loads((tmp_path / "in" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5000.0}
    (tmp_path / "in" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecRankerError, match="rope scaling .*yarn.* is not supported; expected none or rope_type 'linear'"):
        load_hf_llama(tmp_path / "in")
