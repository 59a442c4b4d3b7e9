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


# --- the family table of docs/moe.md (generated here, checked by test_moe) ---------------------------

DOCS_PAGE = "docs/moe.md"
TABLE_BEGIN = "<!-- moe-families: generated by `python -m tests.moe_families`, checked by tests/test_moe.py -->\n"
TABLE_END = "<!-- /moe-families -->"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def family_rows() -> list[tuple[str, str, str, str]]:
    """(model type, class, status, detail) for every MoE family of the causal-LM mapping."""
    from llmprune.errors import LLMPruneError
    from llmprune.models.moe import shared_expert_names
    from llmprune.models.view import model_view

    rows = []
    for model_type, err in build_status().items():
        cls = moe_families()[model_type]
        if err is not None:
            rows.append((model_type, cls, "does not build", f"the tiny config's forward fails: {err}"))
            continue
        try:
            view = model_view(BUILT[model_type])
        except LLMPruneError as exc:
            reason = str(exc).split("; classified")[0].split(" (use_experts_implementation")[0]
            rows.append((model_type, cls, "refused", reason[:200]))
            continue
        moe = [layer for layer in view.layers if layer.is_moe]
        if not moe:
            rows.append((model_type, cls, "dense when tiny", "the 2-layer config has no MoE layer; pruned as a "
                         "dense model"))
            continue
        group = moe[0].experts[0]
        detail = [f"{group.num_experts} experts, top-{group.top_k}"]
        dense = [layer.index for layer in view.layers if not layer.is_moe]
        if dense:
            detail.append(f"dense layer{'s' if len(dense) > 1 else ''} {', '.join(map(str, dense))}")
        if shared_expert_names(moe[0]):
            detail.append("shared experts")
        layout = [word for flag, word in ((group.transposed, "transposed"), (group.has_bias, "biases"),
                                          (group.has_gate and not group.concatenated, "interleaved gate/up"),
                                          (not group.has_gate, "no gate")) if flag]
        if layout:
            detail.append("experts " + ", ".join(layout))
        rows.append((model_type, cls, "supported", "; ".join(detail)))
    return rows


def family_counts(rows: list[tuple[str, str, str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[2]] = counts.get(row[2], 0) + 1
    return counts


def family_table() -> str:
    """The generated region of docs/moe.md: the counts, then one row per family."""
    import transformers

    rows = family_rows()
    counts = family_counts(rows)
    out = [TABLE_BEGIN.rstrip("\n"),
           f"*transformers {transformers.__version__}: {len(rows)} model types of the causal-LM mapping declare "
           f"more than one expert; {counts.get('supported', 0)} supported, {counts.get('refused', 0)} refused, "
           f"{counts.get('does not build', 0)} do not build from a small config, "
           f"{counts.get('dense when tiny', 0)} have no MoE layer in the tiny config.*", "",
           "| model type | class | status | detail |", "|---|---|---|---|"]
    out += [f"| `{t}` | `{c}` | {s} | {_cell(d)} |" for t, c, s, d in rows]
    return "\n".join(out) + "\n" + TABLE_END


def docs_region(text: str) -> str:
    begin = text.index(TABLE_BEGIN.rstrip("\n"))
    return text[begin:text.index(TABLE_END, begin) + len(TABLE_END)]


if __name__ == "__main__":  # python -m tests.moe_families: rewrite the table of docs/moe.md
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / DOCS_PAGE
    text = page.read_text(encoding="utf-8")
    page.write_text(text.replace(docs_region(text), family_table()), encoding="utf-8")
    print(f"{page}: {family_counts(family_rows())}")
