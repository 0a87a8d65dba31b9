"""Scanned layers (one stacked block under nnx.scan) against the looped blocks they replace:
the same logits, gradients, LoRA adapters and KV cache; a compiled program whose size does
not grow with depth; and layout mismatches and unknown remat policies as one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recranker_jax.errors import RecRankerError
from recranker_jax.llm.layout import value_in_layout
from recranker_jax.llm.llama import KVCache, Llama, LlamaConfig
from recranker_jax.llm.lora import apply_lora
from recranker_jax.train.step import answer_loss, jitted_train_step, make_optimizer, train_step

CFG = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=56, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2)


def twins(lora=False, dropout=0.0, **options):
    """A looped model and a scanned one from the same seeds (so the same weights and adapters)."""
    looped = Llama(CFG, nnx.Rngs(0), scan_layers=False, **options)
    scanned = Llama(CFG, nnx.Rngs(0), scan_layers=True, **options)
    if lora:
        apply_lora(looped, ["q", "v", "down"], 4, 8.0, dropout, nnx.Rngs(2))
        apply_lora(scanned, ["q", "v", "down"], 4, 8.0, dropout, nnx.Rngs(2))
        for module in (looped, scanned):  # the same non-zero B, so the adapters matter
            for path, variable in nnx.to_flat_state(nnx.state(module, nnx.LoRAParam)):
                if path[-1] == "lora_b":
                    shape = variable.get_value().shape[-2:]
                    key = jax.random.key(sum(map(ord, str(path[-3:]))))
                    stacked = jnp.stack([0.3 * jax.random.normal(jax.random.fold_in(key, i), shape)
                                         for i in range(CFG.num_hidden_layers)])
                    variable.set_value(stacked if module.scan_layers else stacked[path[1]])
    return looped, scanned


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_the_same_seeds_give_the_same_weights_in_either_layout(lora_dropout):
    looped, scanned = (apply_lora(Llama(CFG, nnx.Rngs(0), scan_layers=scan), ["q", "down"], 4, 8.0, lora_dropout,
                                  nnx.Rngs(1)) for scan in (False, True))
    assert_same_in_either_layout(nnx.state(looped, nnx.Param), nnx.state(scanned, nnx.Param), atol=0)


def packed_batch(seed=0, rows=2, length=40):
    rng = np.random.default_rng(seed)
    segments = np.repeat(np.arange(1, 5), length // 4)[None].repeat(rows, 0).astype(np.int32)
    segments[:, -3:] = 0  # padding
    positions = np.concatenate([np.arange(length // 4)] * 4)[None].repeat(rows, 0).astype(np.int32)
    mask = (rng.random((rows, length)) < 0.4).astype(np.int32)
    return {"tokens": jnp.asarray(rng.integers(0, CFG.vocab_size, (rows, length)).astype(np.int32)),
            "positions": jnp.asarray(positions), "segment_ids": jnp.asarray(segments), "loss_mask": jnp.asarray(mask)}


def assert_same_in_either_layout(looped_state, scanned_state, atol):
    want = {path: variable.get_value() for path, variable in nnx.to_flat_state(looped_state)}
    flat = list(nnx.to_flat_state(scanned_state))
    assert flat
    for path, variable in flat:
        np.testing.assert_allclose(np.asarray(variable.get_value()), np.asarray(value_in_layout(want, path)),
                                   atol=atol, err_msg=str(path))


@pytest.mark.parametrize("lora", [False, True])
def test_scanned_layers_give_the_looped_logits_and_gradients(lora):
    looped, scanned = twins(lora, remat="full")
    batch = packed_batch()
    np.testing.assert_allclose(np.asarray(scanned(batch["tokens"], batch["positions"], batch["segment_ids"])),
                               np.asarray(looped(batch["tokens"], batch["positions"], batch["segment_ids"])), atol=2e-6)
    trained = nnx.LoRAParam if lora else nnx.Param

    def gradients(model):
        grad = nnx.grad(lambda m: answer_loss(m, batch)[0], argnums=nnx.DiffState(0, trained))(model)
        return nnx.state(grad, trained)

    assert_same_in_either_layout(gradients(looped), gradients(scanned), atol=1e-6)


def test_scanned_and_looped_training_steps_reach_the_same_weights():
    looped, scanned = twins(lora=True)
    optimizers = [nnx.Optimizer(m, make_optimizer(1e-2, 1, 10), wrt=nnx.LoRAParam) for m in (looped, scanned)]
    for step in range(3):
        batch = packed_batch(seed=step)
        losses = [float(train_step(m, o, batch)) for m, o in zip((looped, scanned), optimizers)]
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
    assert_same_in_either_layout(nnx.state(looped, nnx.LoRAParam), nnx.state(scanned, nnx.LoRAParam), atol=1e-6)


def test_the_kv_cache_is_the_same_stacked_array_in_both_layouts():
    looped, scanned = twins()
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 9)).astype(np.int32))
    valid = jnp.asarray(np.arange(9)[None] >= np.array([[2], [0]]))  # row 0 left-padded by 2
    positions = jnp.maximum(jnp.arange(9)[None] - jnp.asarray([[2], [0]]), 0)
    outputs = []
    for model in (looped, scanned):
        logits, cache = model.prefill(tokens, KVCache.zeros(CFG, 2, 9), positions, valid)
        cache = cache.grow(3)
        key_valid = jnp.concatenate([valid, jnp.asarray([[True, False, False]] * 2)], axis=1)
        step_logits, cache = model.extend(tokens[:, :1], cache, 9, positions[:, -1:] + 1, key_valid)
        outputs.append((logits, step_logits, cache.keys, cache.values))
    assert outputs[0][2].shape == (CFG.num_hidden_layers, 2, 12, CFG.num_key_value_heads, CFG.head_size)
    for got, want in zip(outputs[1], outputs[0]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def lowered_step_size(layers: int, scan_layers: bool) -> int:
    """Characters of the lowered LoRA training step (abstract shapes: nothing is allocated)."""
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)

    def build():
        model = Llama(cfg, nnx.Rngs(0), scan_layers=scan_layers, remat="full")
        apply_lora(model, ["q", "v"], 4, 8.0, 0.0, nnx.Rngs(1))
        return model, nnx.Optimizer(model, make_optimizer(1e-3, 1, 10), wrt=nnx.LoRAParam)

    model, optimizer = nnx.eval_shape(build)
    batch = {name: jax.ShapeDtypeStruct((2, 64), jnp.int32) for name in ("tokens", "positions", "segment_ids", "loss_mask")}
    return len(jitted_train_step().lower(model, optimizer, batch).as_text())


def test_the_scanned_training_step_does_not_grow_with_depth():
    scanned = lowered_step_size(2, True), lowered_step_size(16, True)
    assert abs(scanned[1] - scanned[0]) <= 0.03 * scanned[0], scanned
    looped = lowered_step_size(2, False), lowered_step_size(16, False)
    assert looped[1] > 4 * looped[0], looped  # what scanning avoids


def test_a_checkpoint_of_the_other_layout_is_a_one_line_error(tmp_path):
    from recranker_jax.train.loop import train
    from recranker_jax.train.packing import PackedRows

    batch = {k: np.asarray(v) for k, v in packed_batch(rows=4).items()}
    rows = PackedRows(batch["tokens"], batch["loss_mask"], batch["segment_ids"], batch["positions"])

    def run(scan_layers, steps):
        model = Llama(CFG, nnx.Rngs(0), scan_layers=scan_layers)
        optimizer = nnx.Optimizer(model, make_optimizer(1e-2, 1, 10), wrt=nnx.Param)
        return train(model, optimizer, rows, batch_size=2, steps=steps, seed=0, checkpoint_dir=tmp_path,
                     save_every=1, progress=False)

    run(scan_layers=False, steps=1)
    with pytest.raises(RecRankerError, match=r"holds looped layers but the model's are scanned; "
                                              r"resume with model.scan_layers=false"):
        run(scan_layers=True, steps=2)
    assert run(scan_layers=False, steps=2)[1] == 2  # the checkpoint was left as it was, and resumes


def test_an_unknown_remat_policy_is_a_one_line_error():
    from recranker_jax.config import load_config

    with pytest.raises(RecRankerError, match=r"train.remat=.sometimes.: expected one of auto, none, minimal, dots, full"):
        Llama(CFG, nnx.Rngs(0), remat="sometimes")
    with pytest.raises(RecRankerError, match=r"config key train.remat: expected 'auto' \| 'none' \| 'minimal'"):
        load_config(None, ["train.remat=true"])


def test_scanned_lora_layers_under_remat_draw_the_dropout_masks_of_the_plain_scan():
    # under remat, LoRA's scanned layers take the frozen weights as constants
    # (Llama._scan_frozen_as_constants) and write the dropout streams back: the same masks,
    # new ones at each call, as nnx.scan without remat draws
    batch = packed_batch()
    calls = {}
    for remat in ("none", "dots", "full"):
        _, scanned = twins(lora=True, remat=remat, dropout=0.5)
        calls[remat] = [np.asarray(scanned(batch["tokens"], batch["positions"], batch["segment_ids"]))
                        for _ in range(2)]
    assert not np.allclose(calls["dots"][0], calls["dots"][1])
    for remat in ("dots", "full"):
        for got, want in zip(calls[remat], calls["none"]):
            np.testing.assert_allclose(got, want, atol=2e-6)
