#!/usr/bin/env python3
"""Where the time of one layer step goes: a LLaMA-2-7B-shaped decoder layer, in memory, on this CPU.

One random-initialized layer (hidden 4096, MLP 11008, bf16) and 8 x 512 calibration tokens, the
streaming benchmark's setting without the disk. Measured, each the best of ``--repeats``:

* ``forward``: the layer's forward over the 8 windows, one window per call (the floor's unit);
* ``forward_one_batch``: the same 4096 tokens in one call (what ``sequential=linear`` runs);
* ``observe``: Wanda's statistics pass (stops once every linear has seen its input);
* ``prune``: Wanda's scores, mask selection and masking of the seven linears;
* ``linear_step``: ``sequential=linear``, statistics and pruning inside one forward.

``--src DIR`` (repeatable) measures other checkouts' ``src`` folders too, each in its own process,
in the same run (e.g. the commit before an optimisation), so their numbers can be compared.

    .venv/bin/python benchmarks/layer_step.py
    .venv/bin/python benchmarks/layer_step.py --src /tmp/old/src --output /tmp/layer_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def measure(repeats: int) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmprune.engine.capture import capture_layer_inputs
    from llmprune.engine.engine import LayerContext
    from llmprune.methods import METHODS
    from llmprune.models.view import model_view
    from llmprune.sparsity.patterns import Pattern

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=1000, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    view = model_view(model)
    layer = view.layers[0]
    dense = {k: t.clone() for k, t in layer.module.state_dict().items()}
    ids = torch.randint(0, 1000, (8, 512), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    wanda = METHODS.get("wanda")
    has_linear = "sequential" in wanda.Options.model_fields
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Any) -> None:
        layer.module.load_state_dict(dense)
        start = time.perf_counter()
        fn()
        times.setdefault(name, []).append(time.perf_counter() - start)

    try:  # the engine's allocation policy (llmprune.engine.heap), where this checkout has it
        from llmprune.engine.heap import heap_allocations
    except ImportError:
        from contextlib import nullcontext as heap_allocations  # type: ignore[assignment]
    with torch.no_grad(), heap_allocations():
        per_window = capture_layer_inputs(model, view.layer_list, list(ids.split(1)), device=cpu, cache_device=cpu)
        one_batch = capture_layer_inputs(model, view.layer_list, [ids], device=cpu, cache_device=cpu)
        ctx = LayerContext(layer, cpu, cpu, per_window.hidden, per_window.args[0], per_window.kwargs[0])
        ctx1 = LayerContext(layer, cpu, cpu, one_batch.hidden, one_batch.args[0], one_batch.kwargs[0])
        ctx.forward()  # warm-up
        for _ in range(repeats):
            timed("forward", ctx.forward)
            timed("forward_one_batch", ctx1.forward)
            timed("observe", lambda: setattr(ctx, "stats", ctx.observe(hessian=False)))
            layer.module.load_state_dict(dense)
            ctx.stats = ctx.observe(hessian=False)
            method = wanda(Pattern(0.5), wanda.Options())
            start = time.perf_counter()
            method.prune_layer(ctx)
            times.setdefault("prune", []).append(time.perf_counter() - start)
            if has_linear:
                from llmprune.engine.engine import _prune_while_observing

                linear = wanda(Pattern(0.5), wanda.Options(sequential="linear"))
                timed("linear_step", lambda m=linear: _prune_while_observing(m, ctx1))
    return {name: round(min(values), 3) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", default=[], help="another checkout's src folder to measure too")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "streaming" / "layer_step.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.repeats)))
        return
    results = {}
    for src in [str(REPO / "src"), *args.src]:
        git = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        proc = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                              env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"measuring {src} failed:\n{proc.stderr[-3000:]}")
        results[src] = {"commit": git.stdout.strip() or None, "seconds": json.loads(proc.stdout.strip().splitlines()[-1])}
        print(src, results[src], flush=True)
    import torch

    from llmprune.io.save import write_json_atomic  # noqa: E402  (the repository's own package)
    from llmprune.report import versions  # noqa: E402

    write_json_atomic(args.output, {
        "protocol": "one LLaMA-2-7B-shaped decoder layer in memory, bf16, 8 x 512 random tokens, Wanda 50%; "
                    f"best of {args.repeats}",
        "results": results, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(), "versions": versions(),
    })


if __name__ == "__main__":
    if "--child" not in sys.argv:  # a child imports llmprune from the PYTHONPATH it was given
        sys.path.insert(0, str(REPO / "src"))
    main()
