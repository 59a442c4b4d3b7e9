#!/usr/bin/env python3
"""Prune a local Hugging Face model with the peer tool llm-compressor (0.14.x).

Run with the peer venv's interpreter (see benchmarks/setup_peer.sh), never with
llmprune's own environment; this script does not import llmprune.

    .venv-peer/bin/python benchmarks/peer_llmcompressor.py \
        --model DIR --calib calib.safetensors --method wanda --sparsity 0.5 \
        --pattern unstructured --output OUT_DIR --json result.json

The calibration file holds one int64 tensor ``input_ids`` of shape
(nsamples, seqlen); exactly those windows are used, in that order, with no
shuffling, truncation or padding.

Notes on llm-compressor 0.14 semantics (read from its source):

* ``mask_structure="N:M"`` there means *prune* N of every M weights
  (``topk(..., prune_n, largest=False)`` marks the pruned ones), while this
  script's ``--pattern N:M`` means *keep* N of every M. The mapping is
  ``mask_structure = f"{M - N}:{M}"`` (identical for 2:4 and 4:8).
  In N:M mode llm-compressor ignores ``sparsity``; we require it to equal 1 - N/M.
* ``targets`` names the *containers* whose Linear submodules get pruned (the
  default ``["Linear"]`` would also catch ``lm_head``), so we target the decoder
  layer class (``model._no_split_modules``, e.g. ``LlamaDecoderLayer``) and
  additionally ignore ``lm_head``.
* pipeline="sequential" with the same decoder-layer ``sequential_targets`` and
  ``propagate_error=True``: each layer is calibrated on the outputs of the
  already-pruned previous layers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

PATTERN_HELP = (
    "'unstructured' or N:M meaning keep N of every M consecutive weights along "
    "the input dimension (e.g. 2:4, 4:8)"
)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Return (keep_n, m) for an N:M pattern, None for unstructured."""
    if pattern == "unstructured":
        return None
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --pattern {pattern!r}: {PATTERN_HELP}") from None
    if not (0 < n < m):
        raise argparse.ArgumentTypeError(f"bad --pattern {pattern!r}: need 0 < N < M")
    return n, m


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path,
                   help="local Hugging Face safetensors model folder")
    p.add_argument("--calib", required=True, type=Path,
                   help="safetensors file with int64 input_ids (nsamples, seqlen)")
    p.add_argument("--method", required=True, choices=["wanda", "sparsegpt"])
    p.add_argument("--sparsity", required=True, type=float,
                   help="target fraction of zeros, e.g. 0.5")
    p.add_argument("--pattern", default="unstructured", help=PATTERN_HELP)
    p.add_argument("--output", required=True, type=Path,
                   help="folder for the pruned model (dense safetensors)")
    p.add_argument("--json", required=True, type=Path, help="results file")
    p.add_argument("--profile", default="uniform", choices=["uniform", "owl"],
                   help="layer-wise sparsity: uniform, or owl (llm-compressor's sparsity_profile='owl')")
    p.add_argument("--owl-m", type=float, default=5.0, help="owl only: outlier threshold M (owl_m)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="owl only: spread lambda (owl_lmbda)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="calibration batch size (llm-compressor default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice)")
    args = p.parse_args(argv)
    try:
        args.nm = parse_pattern(args.pattern)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if not 0.0 < args.sparsity < 1.0:
        p.error("--sparsity must be in (0, 1)")
    if args.nm is not None:
        n, m = args.nm
        if abs(args.sparsity - (m - n) / m) > 1e-9:
            p.error(f"--pattern {args.pattern} keeps {n}/{m}, i.e. sparsity "
                    f"{(m - n) / m:g}; got --sparsity {args.sparsity:g} "
                    "(llm-compressor ignores sparsity in N:M mode)")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.profile == "owl" and args.nm is not None:
        p.error("--profile owl is layer-wise unstructured sparsity; it does not apply to an N:M --pattern")
    return args


def decoder_linears(model, layer_classes):
    """(name, Linear) pairs inside the decoder blocks (never lm_head/embeddings)."""
    import torch

    out = []
    for name, mod in model.named_modules():
        if type(mod).__name__ in layer_classes:
            for sub_name, sub in mod.named_modules():
                if isinstance(sub, torch.nn.Linear):
                    out.append((f"{name}.{sub_name}", sub))
    return out


def sparsity_stats(linears, nm):
    import torch

    zeros = total = 0
    groups = groups_ok = 0
    with torch.no_grad():
        for _, lin in linears:
            w = lin.weight
            zeros += int((w == 0).sum())
            total += w.numel()
            if nm is not None:
                n, m = nm
                rows, cols = w.shape
                usable = cols - cols % m
                g = (w[:, :usable] != 0).reshape(rows, usable // m, m).sum(-1)
                groups += g.numel()
                groups_ok += int((g <= n).sum())
    stats = {"zero_fraction": zeros / total if total else None,
             "zero_weights": zeros, "total_weights": total}
    if nm is not None:
        stats["nm_groups"] = groups
        stats["nm_groups_ok_fraction"] = groups_ok / groups if groups else None
    return stats


def layer_zero_fractions(linears):
    """Zero fraction of each decoder layer's linears together, in layer order (the allocation OWL chose)."""
    import re

    zeros, total = {}, {}
    for name, lin in linears:
        found = re.search(r"layers\.(\d+)\.", name)
        if found is None:
            continue
        i = int(found.group(1))
        zeros[i] = zeros.get(i, 0) + int((lin.weight == 0).sum())
        total[i] = total.get(i, 0) + lin.weight.numel()
    return [zeros[i] / total[i] for i in sorted(total)]


def write_json_atomic(path: Path, data: dict) -> None:
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _patch_owl_calibration() -> str:
    """llm-compressor 0.14's OWL profile cannot run: its modifier's on_initialize collects the
    activation norms through ``pipelines.basic.run_calibration``, whose BasicPipeline fires
    ``calibration_start`` while the session is still initializing (ValueError: "Cannot invoke event
    before initializing"). We replace only that helper, for the OWL statistics pass, by the same
    forward loop without the lifecycle events: llm-compressor's own hooks, activation norms and OWL
    formula (``_infer_owl_layer_sparsity``) are used unchanged, and the pruning pass is untouched.
    A second bug follows it: that method returns a dict {layer name: sparsity}, which
    ``on_calibration_start`` (matching only a list per layer) hands whole to every module as its
    sparsity (TypeError in sparsify_weight); we give it the same values as the list in layer order
    it expects (the dict's order is the order of the target layers)."""
    import llmcompressor.pipelines.basic as basic
    import torch
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
    from llmcompressor.utils.helpers import calibration_forward_context

    infer = SparsityModifierBase._infer_owl_layer_sparsity

    def infer_as_list(self, model, layers, dataloader):  # type: ignore[no-untyped-def]
        sparsities = infer(self, model, layers, dataloader)
        if list(sparsities) != list(layers):
            raise SystemExit("error: llm-compressor's OWL sparsities are not in the order of the target layers")
        return list(sparsities.values())

    SparsityModifierBase._infer_owl_layer_sparsity = infer_as_list

    def run_calibration(model, dataloader) -> None:
        with calibration_forward_context(model), torch.no_grad():
            for batch in dataloader:
                model(**batch)

    basic.run_calibration = run_calibration
    return ("llmcompressor.pipelines.basic.run_calibration replaced for the OWL statistics pass by the same "
            "forward loop without lifecycle events (0.14 raises 'Cannot invoke event before initializing'); "
            "its per-layer OWL sparsities passed as the list in layer order its hooks expect (0.14 passes the dict)")


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).exists() for f in
               ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.utils.pytorch.module import get_no_split_params
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader, SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    # ---- calibration windows, verbatim -------------------------------------
    tensors = load_file(str(args.calib))
    if "input_ids" not in tensors:
        sys.exit(f"error: {args.calib} has no tensor named input_ids")
    ids = tensors["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        sys.exit(f"error: input_ids must be int64 (nsamples, seqlen), got "
                 f"{ids.dtype} {tuple(ids.shape)}")
    nsamples, seqlen = (int(s) for s in ids.shape)
    dataset = Dataset.from_dict({
        "input_ids": ids.tolist(),
        "attention_mask": torch.ones_like(ids).tolist(),
    }).with_format("torch")
    # We hand oneshot a ready DataLoader (a documented input type): it then skips
    # its own sampler/collator, whose LengthAwareSampler would reorder equal-length
    # rows (unstable argsort) and whose RandomSampler would shuffle. This is the
    # same DataLoader llm-compressor builds itself for shuffle=False, minus the
    # reordering: every window is used once, in file order, untruncated, unpadded.
    loader = DataLoader(dataset, batch_size=args.batch_size,
                        sampler=SequentialSampler(dataset),
                        collate_fn=default_data_collator)

    # ---- model, float32 on CPU ---------------------------------------------
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    model.to("cpu").eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        sys.exit(f"error: input_ids outside [0, {vocab})")
    # decoder block class(es), e.g. {"LlamaDecoderLayer"} (a set in transformers 5)
    layer_classes = get_no_split_params(model)
    if isinstance(layer_classes, str) or not layer_classes:
        sys.exit("error: cannot find the decoder layer class (_no_split_modules)")
    layer_classes = sorted(layer_classes)

    # ---- modifier ----------------------------------------------------------
    if args.nm is None:
        mask_structure = "0:0"  # llm-compressor's spelling of unstructured
    else:
        n_keep, m = args.nm
        mask_structure = f"{m - n_keep}:{m}"  # llm-compressor counts PRUNED weights
    modifier_args = {
        "sparsity": args.sparsity,
        "mask_structure": mask_structure,
        "targets": layer_classes,
        "ignore": ["re:.*lm_head"],
    }
    if args.profile == "owl":
        # owl_m is an int field in llm-compressor 0.14 (OWL's M is 5, 7, ... in the paper)
        owl_m = int(args.owl_m) if float(args.owl_m).is_integer() else args.owl_m
        modifier_args.update(sparsity_profile="owl", owl_m=owl_m, owl_lmbda=args.owl_lambda)
    owl_workaround = None
    if args.profile == "owl":
        owl_workaround = _patch_owl_calibration()
    if args.method == "sparsegpt":
        modifier_args.update(block_size=128, dampening_frac=0.01,
                             preserve_sparsity_mask=False, offload_hessians=False)
        modifier = SparseGPTModifier(**modifier_args)
    else:
        modifier = WandaPruningModifier(**modifier_args)

    oneshot_args = {
        "pipeline": "sequential",
        "sequential_targets": layer_classes,
        "propagate_error": True,
        "num_calibration_samples": nsamples,
        "max_seq_length": seqlen,
        "shuffle_calibration_samples": False,
        "batch_size": args.batch_size,
    }
    tokenizer = None
    if has_tokenizer(args.model):
        tokenizer = AutoTokenizer.from_pretrained(str(args.model))

    t0 = time.perf_counter()
    oneshot(model=model, recipe=modifier, dataset=loader,
            processor=tokenizer if tokenizer is not None else _NoProcessor(),
            **oneshot_args)
    prune_seconds = time.perf_counter() - t0

    # ---- results -----------------------------------------------------------
    linears = decoder_linears(model, layer_classes)
    stats = sparsity_stats(linears, args.nm)

    # Save a plain, dense HF checkpoint: call the class's save_pretrained, not the
    # instance wrapper llm-compressor installed (that one writes its
    # compressed-tensors config/format), so any transformers can load it.
    args.output.mkdir(parents=True, exist_ok=True)
    type(model).save_pretrained(model, str(args.output))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(args.output))

    result = {
        "tool": "llmcompressor",
        "method": args.method,
        "sparsity": args.sparsity,
        "pattern": args.pattern,
        "profile": args.profile,
        "owl_workaround": owl_workaround,
        "modifier": type(modifier).__name__,
        "modifier_args": modifier_args,
        "oneshot_args": oneshot_args,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "prune_seconds": prune_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **stats,
        "layer_zero_fractions": layer_zero_fractions(linears),
        "num_decoder_linears": len(linears),
        "model": str(args.model.resolve()),
        "calib": str(args.calib.resolve()),
        "output": str(args.output.resolve()),
        "dtype": "float32",
        "device": "cpu",
        "torch_num_threads": torch.get_num_threads(),
        "versions": {
            "llmcompressor": metadata.version("llmcompressor"),
            "compressed-tensors": metadata.version("compressed-tensors"),
            "transformers": metadata.version("transformers"),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
    }
    write_json_atomic(args.json, result)
    print(json.dumps({k: result[k] for k in
                      ("method", "pattern", "prune_seconds", "zero_fraction",
                       "peak_rss_mb")}))
    return 0


class _NoProcessor:
    """Stand-in processor for model folders without a tokenizer.

    oneshot insists on a processor when given calibration data and would try
    AutoProcessor.from_pretrained(model_dir), which fails without tokenizer files.
    With a pre-built DataLoader of token ids it never uses the processor.
    """


if __name__ == "__main__":
    sys.exit(main())
