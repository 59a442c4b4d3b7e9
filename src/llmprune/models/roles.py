"""Roles of the linear layers inside a decoder block, found by leaf name (and parent for the ambiguous ones).

This table is the only place that knows projection names. Method code asks for roles.
"""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    ATTN_IN = "attn_in"  # q/k/v (or a fused qkv)
    ATTN_OUT = "attn_out"  # attention output projection
    MLP_IN = "mlp_in"  # gate/up or fc1
    MLP_OUT = "mlp_out"  # down or fc2


_BY_LEAF: dict[str, Role] = {
    **dict.fromkeys(["q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn",
                     "query", "key", "value", "W_pack",
                     # multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Lite): low-rank q and kv paths
                     "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"], Role.ATTN_IN),
    **dict.fromkeys(["o_proj", "out_proj", "wo"], Role.ATTN_OUT),
    **dict.fromkeys(["gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3", "c_fc",
                     "dense_h_to_4h"], Role.MLP_IN),
    **dict.fromkeys(["down_proj", "fc2", "w2", "dense_4h_to_h"], Role.MLP_OUT),
}
# Leaf names whose role depends on the parent module (GPT-2/NeoX style).
_BY_PARENT: dict[str, tuple[Role, Role]] = {"dense": (Role.ATTN_OUT, Role.MLP_OUT), "c_proj": (Role.ATTN_OUT, Role.MLP_OUT)}
_ATTN_PARENT_HINTS = ("attn", "attention")


def role_of(name: str) -> Role | None:
    """Role of a linear given its dotted name inside the decoder layer, or None if unknown."""
    parts = name.split(".")
    leaf = parts[-1]
    if leaf in _BY_LEAF:
        return _BY_LEAF[leaf]
    if leaf in _BY_PARENT:
        parent = ".".join(parts[:-1]).lower()
        attn, mlp = _BY_PARENT[leaf]
        return attn if any(h in parent for h in _ATTN_PARENT_HINTS) else mlp
    return None
