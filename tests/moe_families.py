"""Every Mixture-of-Experts family of transformers' causal-LM mapping, as a tiny random model.

The families are enumerated, not listed: each model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``
whose default config declares more than one expert (under any of the names families use). A tiny
config is derived from the default one by shrinking the widths, the expert count (4, top-2) and
the depth (2 layers; per-layer lists cut to 2; ``first_k_dense_replace`` 1 so that layer 0 is dense
where the family has dense layers). Families whose config rejects that generic shrinking, or whose
tiny model does not run a forward, are reported as "does not build" with the error.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import transformers as tf

from llmprune.models.moe import EXPERT_COUNT_KEYS

_SMALL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, expert_intermediate_size=32,
              shared_expert_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              vocab_size=128, num_experts_per_tok=2, moe_topk=2, moe_k=2, n_group=1, topk_group=1,
              kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
              max_position_embeddings=256, n_shared_experts=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
NUM_EXPERTS = 4
TOP_K = 2
LAYERS = 2


def _default_config(model_type: str) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CONFIG_MAPPING[model_type]()


def _expert_count(config: Any) -> int:
    counts = [getattr(config, k, None) for k in EXPERT_COUNT_KEYS]
    return max([c for c in counts if isinstance(c, int) and not isinstance(c, bool)] or [0])


@functools.cache
def moe_families() -> dict[str, str]:
    """model_type -> causal-LM class name, for every family whose default config has experts."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        try:
            config = _default_config(model_type)
        except Exception:  # noqa: BLE001  (a config that needs arguments is not probed)
            continue
        if _expert_count(config) > 1:
            found[model_type] = class_name
    return found


def tiny_moe_config(model_type: str, layers: int = LAYERS, **overrides: Any) -> Any:
    base = _default_config(model_type)
    d = base.to_dict()
    n0 = d.get("num_hidden_layers")
    kw: dict[str, Any] = {}
    for key, value in d.items():
        if key in _SMALL and (isinstance(value, int) and not isinstance(value, bool) or value is None and
                              key in ("num_experts_per_tok", "pad_token_id")):
            kw[key] = _SMALL[key]
        if key in EXPERT_COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool) and value > 1:
            kw[key] = NUM_EXPERTS
        if isinstance(value, list) and n0 and len(value) == n0:
            kw[key] = value[:layers]
    if "kv_lora_rank" in d:  # multi-head latent attention: the rotary part is the head_dim
        kw["head_dim"] = kw.get("qk_rope_head_dim", 8)
    kw["num_hidden_layers"] = layers
    if d.get("first_k_dense_replace"):
        kw["first_k_dense_replace"] = 1
    kw.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(base)(**{**d, **kw})


def tiny_moe(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random model of an MoE family, eval mode, float32, deterministic for a seed."""
    torch.manual_seed(seed)
    config = tiny_moe_config(model_type, **overrides)
    model = getattr(tf, moe_families()[model_type])(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() in (2, 3) and "embed" not in name and p.shape[-1] > 1:
                p.normal_(0.0, 0.08)
    return model.float().eval()


BUILT: dict[str, torch.nn.Module] = {}  # the models build_status made (seed 0), for read-only checks


@functools.cache
def build_status() -> dict[str, str | None]:
    """model_type -> None when the tiny model builds and runs a forward, else the error."""
    out: dict[str, str | None] = {}
    for model_type in moe_families():
        try:
            model = tiny_moe(model_type)
            with torch.no_grad():
                model(input_ids=torch.randint(0, 100, (1, 8)))
            BUILT[model_type] = model
            out[model_type] = None
        except Exception as exc:  # noqa: BLE001  (recorded: the family is listed as not building)
            out[model_type] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return out


def buildable() -> list[str]:
    return [t for t, err in build_status().items() if err is None]
