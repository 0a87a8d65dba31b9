"""Rematerialisation policies of the LLaMA layers (`train.remat`): what a layer keeps from its
forward pass for the backward pass, and what it computes again.

The layer tags its intermediate results with `jax.ad_checkpoint.checkpoint_name` (the names in
`CHECKPOINT_NAMES`); a policy is a `jax.checkpoint_policies` rule over those tags or over the
operations:

- none: no rematerialisation; the backward pass reads everything it needs (fastest, the most
  memory: a LoRA step of LLaMA-2 7B at 2 x 2048 tokens keeps roughly 15 GB);
- minimal: keep the attention's inputs and result (q, k, v after rotary, the attention output)
  and recompute the rest (norms, MLP, projections of the residual stream): attention, the
  costliest part to recompute per byte kept, runs once;
- dots: keep the seven projections' outputs (q, k, v, o, gate, up, down; tagged by name, in
  the activations' dtype) and recompute the attention, the norms, rotary, the LoRA adapters'
  inner products and the elementwise operations. (JAX's `dots_with_no_batch_dims_saveable`,
  which this policy was before, also kept the adapters' float32 products; docs/scale-out.md);
- full: keep only each layer's input and recompute the whole layer (the least memory, one
  more forward pass of compute, what PyTorch's gradient checkpointing does).
- auto: none on the CPU (host memory is plentiful, the quickstart measured fastest without);
  on accelerators the finetune asks the compiler for the fastest policy that fits
  (`train.remat_choice`), and `resolve` gives `ACCELERATOR_DEFAULT` where nothing asks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from recranker_jax.errors import RecRankerError

POLICIES = ("auto", "none", "minimal", "dots", "full")
ACCELERATOR_DEFAULT = "dots"
# Tags in the layer (llama.py): the attention's inputs after rotary and its output.
CHECKPOINT_NAMES = ("query", "key", "value", "attention")
# ... and the outputs of the seven projections.
PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def resolve(policy: str, platform: str | None = None) -> str:
    """The policy to use: `auto` chosen per platform (default: JAX's default backend)."""
    if policy not in POLICIES:
        raise RecRankerError(f"train.remat={policy!r}: expected one of {', '.join(POLICIES)}")
    if policy != "auto":
        return policy
    platform = platform or jax.default_backend()
    return "none" if platform == "cpu" else ACCELERATOR_DEFAULT


def checkpoint_policy(policy: str) -> Callable | None:
    """The `jax.checkpoint` policy of a resolved policy other than none (None: save nothing)."""
    policies = jax.checkpoint_policies
    return {
        "minimal": policies.save_only_these_names(*CHECKPOINT_NAMES),
        "dots": policies.save_only_these_names(*PROJECTION_NAMES),
        "full": policies.nothing_saveable,
    }[policy]
