import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recranker_jax.errors import RecRankerError
from recranker_jax.llm.hf_import import load_hf_llama
from recranker_jax.llm.llama import Llama, LlamaConfig
from recranker_jax.llm.lora import (
    LoRALinear,
    apply_lora,
    export_peft,
    lora_modules,
    lora_parameter_count,
    merge_lora,
)

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
TINY = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


@nnx.jit
def forward(model, inputs):
    """Logits, compiled once per model structure (op-by-op dispatch is slow on small CPUs)."""
    return model(inputs)


def tiny_model(seed=0, scan_layers=True):
    return Llama(TINY, nnx.Rngs(seed), scan_layers=scan_layers)


def block(model, index):
    """Layer `index`'s block (looped layers), or the stacked block of scanned layers."""
    return model.layers if model.scan_layers else model.layers[index]


@pytest.fixture(params=[True, False], ids=["scanned", "looped"])
def scan_layers(request):
    return request.param


def tokens(batch=2, length=11, seed=0, vocab=61):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)))


def randomise_b(model, seed=1, scale=0.2):
    """Non-zero B everywhere, so the adapters change the logits."""
    key = jax.random.key(seed)
    for module in lora_modules(model).values():
        key, sub = jax.random.split(key)
        module.lora_b.set_value(scale * jax.random.normal(sub, module.lora_b.shape))


def expected_lora_count(cfg, projections, rank):
    d, hd = cfg.hidden_size, cfg.head_size
    shapes = {"q_proj": (d, cfg.num_attention_heads * hd), "k_proj": (d, cfg.num_key_value_heads * hd),
              "v_proj": (d, cfg.num_key_value_heads * hd), "o_proj": (cfg.num_attention_heads * hd, d),
              "gate_proj": (d, cfg.intermediate_size), "up_proj": (d, cfg.intermediate_size),
              "down_proj": (cfg.intermediate_size, d)}
    return cfg.num_hidden_layers * sum(rank * sum(shapes[p]) for p in projections)


def test_fresh_adapters_leave_logits_unchanged(scan_layers):
    model = tiny_model(scan_layers=scan_layers)
    inputs = tokens()
    base_logits = np.asarray(forward(model, inputs))
    apply_lora(model, ALL_TARGETS, rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(1))
    assert len(lora_modules(model)) == 7 * (1 if scan_layers else TINY.num_hidden_layers)
    assert isinstance(block(model, 1).mlp.down_proj, LoRALinear)
    # B = 0 makes the update exactly zero
    np.testing.assert_array_equal(np.asarray(forward(model, inputs)), base_logits)
    # A follows PEFT's kaiming-uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), not zero
    lora_a = np.asarray(block(model, 0).mlp.down_proj.lora_a[...])
    bound = 1 / np.sqrt(TINY.intermediate_size)
    assert lora_a.shape == (TINY.num_hidden_layers,) * scan_layers + (TINY.intermediate_size, 4)
    if scan_layers:  # each layer its own draw
        assert not np.array_equal(lora_a[0], lora_a[1])
    assert np.abs(lora_a).max() <= bound and np.abs(lora_a).max() > 0.8 * bound


def test_merge_gives_the_unmerged_logits(scan_layers):
    model = tiny_model(scan_layers=scan_layers)
    inputs = tokens()
    base_logits = np.asarray(forward(model, inputs))
    # the same adapters as above (q_proj and q name the same projection), so the compiled forward is reused
    apply_lora(model, ["q_proj", "k", "v", "o_proj", "gate", "up", "down_proj"], rank=4, alpha=8.0, dropout=0.0,
               rngs=nnx.Rngs(2))
    randomise_b(model)
    lora_logits = np.asarray(forward(model, inputs))
    assert np.abs(lora_logits - base_logits).max() > 1e-2
    merge_lora(model)
    assert not lora_modules(model)
    assert type(block(model, 0).self_attn.q_proj) is nnx.Linear
    assert type(block(model, 1).mlp.down_proj) is nnx.Linear
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    np.testing.assert_allclose(np.asarray(forward(model, inputs)), lora_logits, atol=1e-5, rtol=1e-5)


def test_dropout_is_active_in_training_and_off_in_eval(scan_layers):
    model = tiny_model(scan_layers=scan_layers)
    inputs = tokens()
    base_logits = np.asarray(forward(model, inputs))
    apply_lora(model, ["q", "v"], rank=4, alpha=4.0, dropout=0.5, rngs=nnx.Rngs(3))
    # B = 0 makes the update exactly zero even with dropout active (train mode)
    np.testing.assert_array_equal(np.asarray(forward(model, inputs)), base_logits)
    randomise_b(model)
    first, second = np.asarray(forward(model, inputs)), np.asarray(forward(model, inputs))
    assert np.abs(first - second).max() > 1e-4  # fresh masks on each call
    model.eval()
    evaluated = np.asarray(forward(model, inputs))
    np.testing.assert_array_equal(np.asarray(forward(model, inputs)), evaluated)
    merge_lora(model)  # the merged model is the adapter model without dropout
    np.testing.assert_allclose(np.asarray(forward(model, inputs)), evaluated, atol=1e-5, rtol=1e-5)


def test_only_adapters_train(scan_layers):
    projections = ("q_proj", "v_proj", "down_proj")
    rank = 4
    model = tiny_model(scan_layers=scan_layers)
    apply_lora(model, projections, rank=rank, alpha=8.0, dropout=0.1, rngs=nnx.Rngs(4))
    randomise_b(model)  # with B = 0 the gradient of A would be zero too
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    expected = expected_lora_count(TINY, projections, rank)
    assert lora_parameter_count(model) == expected
    adam_state = optimizer.opt_state[0]
    assert sum(x.size for x in jax.tree.leaves(adam_state.mu)) == expected
    assert sum(x.size for x in jax.tree.leaves(adam_state.nu)) == expected

    frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    base_before = jax.tree.map(np.asarray, nnx.state(model, frozen))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    inputs = tokens(length=12)

    @nnx.jit
    def train_step(model, optimizer, inputs):
        def loss_fn(model):
            logits = model(inputs[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, inputs[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss, grads

    _, grads = train_step(model, optimizer, inputs)
    assert sum(x.size for x in jax.tree.leaves(grads)) == expected

    base_after = jax.tree.map(np.asarray, nnx.state(model, frozen))
    jax.tree.map(np.testing.assert_array_equal, base_after, base_before)
    lora_after = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    for path, before in nnx.to_flat_state(lora_before):
        assert not np.array_equal(np.asarray(lora_after[path][...]), before[...]), path


@pytest.mark.parametrize(("targets", "scan_layers"), [(("q", "v"), True), (ALL_TARGETS, True), (ALL_TARGETS, False)])
def test_peft_export_gives_the_same_logits_in_torch(tmp_path, targets, scan_layers):
    torch = pytest.importorskip("torch", reason="the PyTorch reference needs the test extra")
    peft = pytest.importorskip("peft")
    from tests.test_llm_llama import save_tiny_llama

    reference = save_tiny_llama(tmp_path / "base")
    model = load_hf_llama(tmp_path / "base", scan_layers=scan_layers)
    rank, alpha, dropout = 4, 6.0, 0.05
    apply_lora(model, targets, rank=rank, alpha=alpha, dropout=dropout, rngs=nnx.Rngs(5))
    randomise_b(model)
    model.eval()
    export_peft(model, tmp_path / "adapter", str(tmp_path / "base"), targets, rank, alpha, dropout)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == rank and config["lora_alpha"] == alpha and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == sorted(f"{t}_proj" for t in targets)

    inputs = np.random.default_rng(0).integers(0, 97, (2, 13))
    with torch.no_grad():
        base_logits = reference(torch.from_numpy(inputs)).logits.numpy()
        adapted = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
        torch_logits = adapted(torch.from_numpy(inputs)).logits.numpy()
    n_loaded = sum(1 for name, _ in adapted.named_parameters() if "lora_" in name)
    assert n_loaded == 2 * len(targets) * 3
    assert np.abs(torch_logits - base_logits).max() > 1e-2  # the adapter was loaded and matters
    got = np.asarray(forward(model, jnp.asarray(inputs)))
    np.testing.assert_allclose(got, torch_logits, atol=1e-4, rtol=1e-4)


def test_bad_targets_and_hyperparameters_are_one_line_errors():
    model = tiny_model()
    with pytest.raises(RecRankerError, match=r"unknown LoRA target 'qkv'; expected some of q, k, v, o, gate, up, down"):
        apply_lora(model, ["q", "qkv"], rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(RecRankerError, match=r"LoRA targets are empty"):
        apply_lora(model, [], rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(RecRankerError, match=r"LoRA rank=0: expected an integer >= 1"):
        apply_lora(model, ["q"], rank=0, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(RecRankerError, match=r"LoRA dropout=1.0"):
        apply_lora(model, ["q"], rank=4, alpha=8.0, dropout=1.0, rngs=nnx.Rngs(0))
    assert not lora_modules(model)  # nothing was half-applied
    apply_lora(model, ["q"], rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(RecRankerError, match=r"layers.q_proj already has a LoRA adapter"):
        apply_lora(model, ["q_proj"], rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(0))


def test_export_refuses_a_config_that_does_not_match_the_model(tmp_path):
    model = tiny_model()
    with pytest.raises(RecRankerError, match="no LoRA adapters"):
        export_peft(model, tmp_path, "base", ["q"], 4, 8.0, 0.0)
    apply_lora(model, ["q", "v"], rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(RecRankerError, match=r"differ from the model's adapted projections \['q_proj', 'v_proj'\]"):
        export_peft(model, tmp_path, "base", ["q"], 4, 8.0, 0.0)
    with pytest.raises(RecRankerError, match=r"has rank 4, alpha 8.0; export asked for rank 8"):
        export_peft(model, tmp_path, "base", ["q", "v"], 8, 8.0, 0.0)
    assert not (tmp_path / "adapter_config.json").exists()
