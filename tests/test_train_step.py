import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recranker_jax.config import MeshConfig
from recranker_jax.errors import RecRankerError
from recranker_jax.llm.llama import Llama, LlamaConfig
from recranker_jax.parallel import make_mesh, place_batch
from recranker_jax.train.packing import pack
from recranker_jax.train.step import answer_loss, make_optimizer, shard_model, train_step, train_step_stats

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


def examples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt, answer = rng.integers(3, 64, rng.integers(5, 20)), rng.integers(3, 64, rng.integers(1, 4))
        ids = np.concatenate([prompt, answer, [2]]).astype(np.int32)
        mask = np.concatenate([np.zeros(len(prompt)), np.ones(len(answer) + 1)]).astype(np.int32)
        out.append((ids, mask))
    return out


def test_packing_keeps_examples_whole_and_masks_only_answers():
    data = examples(20)
    rows = pack(data, 48)
    assert rows.tokens.shape[1] == 48 and len(rows) < 20  # several examples share rows
    recovered = []
    for r in range(len(rows)):
        for s in range(1, rows.segment_ids[r].max() + 1):
            where = rows.segment_ids[r] == s
            recovered.append(rows.tokens[r][where])
            assert (rows.positions[r][where] == np.arange(where.sum())).all()
    # First-fit may move a short example into an earlier row: compare as multisets.
    assert sorted(map(tuple, recovered)) == sorted(tuple(ids) for ids, _ in data)
    assert rows.loss_mask.sum() == sum(m[1:].sum() for _, m in data)
    with pytest.raises(RecRankerError, match="more than the training sequence length 10"):
        pack(data, 10)


def test_loss_is_the_mean_answer_token_cross_entropy():
    model = Llama(CFG, nnx.Rngs(0))
    ids, mask = examples(1, seed=3)[0]
    rows = pack([(ids, mask)], len(ids))
    batch = place_batch({"tokens": rows.tokens, "loss_mask": rows.loss_mask, "segment_ids": rows.segment_ids,
                         "positions": rows.positions}, None, {})
    loss, count = answer_loss(model, batch)
    logits = np.asarray(model(jnp.asarray(ids[None])))[0]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    answer_positions = np.flatnonzero(mask[1:])  # predicting token t+1 from position t
    want = -np.mean([log_probs[t, ids[t + 1]] for t in answer_positions])
    assert float(count) == len(answer_positions)
    assert float(loss) == pytest.approx(want, rel=1e-5)


def run(mesh_shape, steps=4):
    model = Llama(CFG, nnx.Rngs(0))
    mesh, rules = None, MeshConfig().rules
    if mesh_shape is not None:
        mesh = make_mesh(MeshConfig(shape=list(mesh_shape)))
        shard_model(model, mesh, rules)
    optimizer = nnx.Optimizer(model, make_optimizer(1e-2, 2, steps), wrt=nnx.Param)
    rows = pack(examples(40), 32)
    losses = []
    for step in range(steps):
        take = slice((step * 8) % (len(rows) - 7), (step * 8) % (len(rows) - 7) + 8)
        batch = place_batch({"tokens": rows.tokens[take], "loss_mask": rows.loss_mask[take],
                             "segment_ids": rows.segment_ids[take], "positions": rows.positions[take]}, mesh, rules)
        losses.append(float(train_step(model, optimizer, batch)))
    return losses, model


@functools.lru_cache(maxsize=1)
def single_device_losses() -> list[float]:
    return run(None)[0]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices (tests/conftest.py)")
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_training_matches_one_device(shape):
    single = single_device_losses()
    sharded, model = run(shape)
    assert single[-1] < single[0]  # it learns
    # float32 reductions in another order across shards; relative 1e-4 over 4 AdamW steps
    np.testing.assert_allclose(sharded, single, rtol=1e-4)
    kernel = model.layers.mlp.gate_proj.kernel.get_value()  # scanned layers: [layers, embed, mlp]
    assert len({s.data.shape for s in kernel.addressable_shards}) == 1
    assert kernel.addressable_shards[0].data.shape == (CFG.num_hidden_layers, 32 // shape[1], 64 // shape[2])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices (tests/conftest.py)")
def test_a_weight_whose_module_has_no_logical_axes_is_an_error():
    """A new projection not named in WEIGHT_AXES would be replicated whole on every device; LoRA
    adapters, norm weights and random-stream state are replicated on purpose, without error."""
    from recranker_jax.llm.lora import apply_lora

    mesh, rules = make_mesh(MeshConfig(shape=[1, 4, 2])), MeshConfig().rules
    for scan_layers in (True, False):
        model = Llama(CFG, nnx.Rngs(0), scan_layers=scan_layers)
        apply_lora(model, ["q", "v"], 4, 8.0, 0.1, nnx.Rngs(1))  # dropout 0.1: adapters with a random stream
        shard_model(model, mesh, rules)
        layer = model.layers if scan_layers else model.layers[0]
        for variable in (layer.self_attn.q_proj.lora_a, layer.self_attn.q_proj.lora_b, layer.input_layernorm.weight,
                         model.norm.weight, layer.self_attn.q_proj.dropout.rngs.key,
                         layer.self_attn.q_proj.dropout.rngs.count):
            assert variable.get_value().sharding.is_fully_replicated
        assert not layer.mlp.gate_proj.kernel.get_value().sharding.is_fully_replicated

        layer.mlp.extra_proj = nnx.Linear(CFG.hidden_size, CFG.hidden_size, rngs=nnx.Rngs(2))
        with pytest.raises(RecRankerError, match=r"^layers/(0/)?mlp/extra_proj/kernel: .*WEIGHT_AXES"):
            shard_model(model, mesh, rules)


def fresh():
    """A new model and optimizer, as a restarted process would build them."""
    model = Llama(CFG, nnx.Rngs(1))
    return model, nnx.Optimizer(model, make_optimizer(5e-3, 2, 6), wrt=nnx.Param)


def test_interrupted_training_resumes_to_the_uninterrupted_result(tmp_path):
    from recranker_jax.train.loop import train

    rows = pack(examples(60, seed=4), 32)

    model, optimizer = fresh()
    straight, _ = train(model, optimizer, rows, batch_size=4, steps=6, seed=0, progress=False)
    model_a, optimizer_a = fresh()
    first, reached = train(model_a, optimizer_a, rows, batch_size=4, steps=3, seed=0, checkpoint_dir=tmp_path, save_every=2, progress=False)
    model_b, optimizer_b = fresh()  # a new process: nothing in memory survives
    second, _ = train(model_b, optimizer_b, rows, batch_size=4, steps=6, seed=0, checkpoint_dir=tmp_path, save_every=2, progress=False)
    assert reached == 3 and [s.step for s in second] == [4, 5, 6]
    np.testing.assert_allclose([s.loss for s in first + second], [s.loss for s in straight], rtol=1e-6)
    tokens = jnp.asarray(rows.tokens[:2])
    np.testing.assert_allclose(np.asarray(model_b(tokens)), np.asarray(model(tokens)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_stops_after_the_step_and_leaves_a_checkpoint(tmp_path, signal_name):
    import os
    import signal

    import orbax.checkpoint as ocp

    from recranker_jax.train.loop import train

    rows = pack(examples(30, seed=5), 32)
    model = Llama(CFG, nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, make_optimizer(5e-3, 2, 50), wrt=nnx.Param)

    def preempt(entry):
        if entry.step == 2:
            os.kill(os.getpid(), getattr(signal, signal_name))  # a TPU / Slurm preemption, or Ctrl-C

    logs, reached = train(model, optimizer, rows, batch_size=4, steps=50, seed=0, checkpoint_dir=tmp_path,
                 save_every=100, log=preempt, progress=False)
    assert [entry.step for entry in logs] == [1, 2] and reached == 2
    assert ocp.CheckpointManager(tmp_path.resolve()).latest_step() == 2


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    from recranker_jax.train.loop import train

    rows = pack(examples(60, seed=4), 32)

    model, optimizer = fresh()
    straight, _ = train(model, optimizer, rows, batch_size=4, steps=6, seed=0, progress=False)
    model_a, optimizer_a = fresh()
    train(model_a, optimizer_a, rows, batch_size=4, steps=4, seed=0, checkpoint_dir=tmp_path, save_every=2, progress=False)
    # A crash while writing step 4: its array data is garbage.
    damaged = [p for p in (tmp_path / "4").rglob("*") if p.is_file() and p.stat().st_size > 0]
    for path in damaged:
        path.write_bytes(b"\0" * 7)
    model_b, optimizer_b = fresh()
    with caplog.at_level("WARNING"):
        resumed, _ = train(model_b, optimizer_b, rows, batch_size=4, steps=6, seed=0, checkpoint_dir=tmp_path,
                           save_every=2, progress=False)
    assert "checkpoint step 4" in caplog.text and "falling back" in caplog.text
    assert [s.step for s in resumed] == [3, 4, 5, 6]  # from step 2, the one before
    np.testing.assert_allclose([s.loss for s in resumed], [s.loss for s in straight[2:]], rtol=1e-6)


def test_the_persistent_compilation_cache_lives_in_run_root_and_is_off_on_the_cpu_by_default(tmp_path):
    from recranker_jax.config import load_config
    from recranker_jax.train.stage import COMPILATION_CACHE, use_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        assert use_compilation_cache(load_config(None, [f"run.root={tmp_path}"])) is None  # auto, on the CPU
        assert use_compilation_cache(load_config(None, [f"run.root={tmp_path}", "run.compilation_cache=never"])) is None
        assert jax.config.jax_compilation_cache_dir == before
        folder = use_compilation_cache(load_config(None, [f"run.root={tmp_path}", "run.compilation_cache=always"]))
        assert folder == tmp_path.resolve() / COMPILATION_CACHE
        assert jax.config.jax_compilation_cache_dir == str(folder)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_a_non_finite_loss_stops_training_naming_the_step_and_keeps_the_checkpoints_before_it(tmp_path):
    from recranker_jax.train.loop import train

    rows = pack(examples(30, seed=5), 32)
    model = Llama(CFG, nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, make_optimizer(1e30, 0, 20), wrt=nnx.Param)  # step 2's update overflows
    with pytest.raises(RecRankerError) as err:
        train(model, optimizer, rows, batch_size=4, steps=20, seed=0, checkpoint_dir=tmp_path, save_every=1,
              progress=False, diverged_hint="train.lr=1e+30")
    assert str(err.value) == ("finetune: the loss is nan at step 3: training diverged and stopped, not marked done; its "
                              "checkpoint of step 1 is kept; lower the learning rate (train.lr=1e+30)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # step 2's weights gave the nan: removed


def test_the_step_reports_the_global_norm_of_the_gradients_before_clipping():
    import optax

    model = Llama(CFG, nnx.Rngs(0))
    rows = pack(examples(12), 32)
    batch = {"tokens": rows.tokens[:4], "loss_mask": rows.loss_mask[:4], "segment_ids": rows.segment_ids[:4],
             "positions": rows.positions[:4]}
    grads = nnx.grad(lambda m: answer_loss(m, batch)[0])(model)  # before the update, computed apart
    want = float(optax.global_norm(jax.tree.leaves(nnx.state(grads, nnx.Param))))
    optimizer = nnx.Optimizer(model, make_optimizer(1e-2, 0, 4, clip_norm=1e-3), wrt=nnx.Param)  # clipping on
    loss, norm = train_step_stats(model, optimizer, batch)
    assert want > 1e-3 and float(norm) == pytest.approx(want, rel=1e-5)
