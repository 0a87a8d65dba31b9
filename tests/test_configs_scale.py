"""The paper-scale configs load, name their dataset / model / tuning, and fit their default mesh."""

from pathlib import Path

import pytest

from recranker_jax.config import load_config
from recranker_jax.plan import plan_memory

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PAPER = sorted((CONFIGS / "paper").glob("*.yaml"))
SCALE = PAPER + [CONFIGS / "llama2-7b-lora.yaml", CONFIGS / "llama2-13b-lora.yaml"]
SOURCES = {"ml-100k": ("ml-100k", 5000), "ml-1m": ("ml-1m", 10000), "bookcrossing": ("bookcrossing", 5000)}


def test_all_twelve_paper_configs_exist():
    expected = {f"{d}-llama2-{s}-{t}.yaml" for d in SOURCES for s in ("7b", "13b") for t in ("lora", "full")}
    assert {p.name for p in PAPER} == expected


@pytest.mark.parametrize("path", SCALE, ids=lambda p: p.name)
def test_config_loads_and_says_what_its_name_says(path):
    cfg = load_config(path)
    dataset, size, tuning = path.stem.rsplit("-llama2-", 1)[0], path.stem.split("-")[-2], path.stem.split("-")[-1]
    if path.parent == CONFIGS:
        dataset = "ml-100k"
    source, sample_size = SOURCES[dataset]
    assert cfg.data.source == source and cfg.data.path and cfg.sampling.size == sample_size
    assert cfg.model.checkpoint == f"checkpoints/Llama-2-{size}-hf" == cfg.prompts.tokenizer
    assert cfg.train.seq_len == 2048 and cfg.train.lora.enabled == (tuning == "lora")
    if tuning == "lora":
        lora = cfg.train.lora
        assert (lora.targets, lora.rank, lora.alpha, cfg.train.lr) == (["q", "v"], 8, 16.0, 1e-4)
    # frozen LoRA bases in bfloat16; full fine-tuning keeps float32 master weights; bfloat16 compute
    assert (cfg.model.param_dtype, cfg.model.dtype) == ("bfloat16" if tuning == "lora" else "float32", "bfloat16")


@pytest.mark.parametrize("path", SCALE, ids=lambda p: p.name)
def test_default_mesh_fits_8x_h100(path):
    """The machine each config's default mesh is for (its comment): 8 H100 80GB, with headroom."""
    plan = plan_memory(load_config(path), 8, arch=f"llama2-{path.stem.split('-')[-2]}",
                       device_kind="NVIDIA H100 80GB HBM3")
    used = plan["bytes_per_device"]["total"] / (plan["device_memory_gb"] * 1e9)
    assert plan["fits"] and used < 0.8, plan["bytes_per_device"]
