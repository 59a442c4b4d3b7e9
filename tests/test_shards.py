"""The safetensors writer and reader of models/shards, and the allocation policy of engine/heap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmprune.engine import heap
from llmprune.errors import LLMPruneError
from llmprune.models.shards import SINGLE_NAME, BufferPool, ShardReader, write_safetensors


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 10, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(10, generator=g),
        "a.half": torch.randn(3, 2, generator=g).half(),
        "a.double": torch.randn(2, generator=g).double(),
        "step": torch.tensor(7, dtype=torch.int64),
        "mask": torch.rand(4, 4, generator=g) < 0.5,
        "bytes": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
        "view": torch.randn(8, 8, generator=g)[:, ::2],  # not contiguous
    }


def test_writer_matches_safetensors_byte_for_byte(tmp_path: Path) -> None:
    ts = tensors()
    write_safetensors(ts, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert set(back) == set(ts)
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_writer_refuses_a_dtype_safetensors_cannot_store(tmp_path: Path) -> None:
    with pytest.raises(LLMPruneError, match="complex64, which safetensors cannot store"):
        write_safetensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")


def test_reader_loads_what_safetensors_wrote_into_owned_memory(tmp_path: Path) -> None:
    ts = tensors()
    save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp_path / "model.safetensors"))
    reader = ShardReader.open(tmp_path)
    got = reader.load(["step", "mask", "empty", "model.layers.0.mlp.up_proj.weight"])
    for k, v in got.items():
        assert v.dtype == ts[k].dtype and torch.equal(v, ts[k])
    got["model.layers.0.mlp.up_proj.weight"].zero_()  # ours to write: the file is untouched
    assert torch.equal(reader.load(["model.layers.0.mlp.up_proj.weight"])["model.layers.0.mlp.up_proj.weight"],
                       ts["model.layers.0.mlp.up_proj.weight"])


def test_reader_reports_a_file_that_ends_inside_a_tensor(tmp_path: Path) -> None:
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    reader = ShardReader.open(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # cut after the reader was opened
    with pytest.raises(LLMPruneError, match="model.safetensors cannot be read .*ends inside w.*corrupt"):
        reader.load(["w"])


def test_heap_policy_nests_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = heap.malloc_policy()
    with heap.heap_allocations() as outer:
        with heap.heap_allocations() as inner:
            assert heap._depth == (2 if outer.policy.startswith("glibc") else 0)
            x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MB: above any mmap threshold
            del x
            inner.trim()
        assert outer.policy == expected
    assert heap._depth == 0
    monkeypatch.setenv(heap.ENV, "off")
    with pytest.raises(LLMPruneError, match="LLMPRUNE_MALLOC='off' is not a setting; use LLMPRUNE_MALLOC=heap"):
        heap.malloc_policy()
    monkeypatch.setenv(heap.ENV, "default")
    assert heap.malloc_policy() == "system default"
    with heap.heap_allocations() as off:
        off.trim()  # does nothing, and does not fail
        assert heap._depth == 0


@pytest.mark.parametrize("chunk", [4096, 3 * 4096, 32 << 20])
def test_direct_writer_is_byte_identical(chunk: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmprune.models.shards as shards

    parts = [b"\x01" * 10, bytes(range(256)) * 33, b"", b"\x02" * 9000]
    if not shards._write_direct(tmp_path / "probe", parts):
        pytest.skip("this file system does not take O_DIRECT writes")
    assert (tmp_path / "probe").read_bytes() == b"".join(parts)  # padded, then truncated to its length
    monkeypatch.setattr(shards, "_DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(shards, "_DIRECT_CHUNK", chunk)  # staging buffer filled and flushed many times
    ts = tensors() | {"big": torch.randn(100, 123)}
    write_safetensors(ts, tmp_path / "direct.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_buffer_pool_recycles_only_unshared_tensors(tmp_path: Path) -> None:
    pool = BufferPool()
    free, viewed, held = torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(4, 8)
    alias = viewed[1:]  # another tensor on the same storage
    kept_elsewhere = [held]
    free_ptr = free.data_ptr()
    given = [free, viewed, held, torch.zeros(16)[4:]]  # the last is an offset view of a larger storage
    del free  # only the list holds it now
    pool.give(given)
    assert given == []
    assert pool.nbytes == 4 * 8 * 4  # only the unshared one
    assert pool.take((4, 8), torch.bfloat16) is None and pool.take((8, 4), torch.float32) is None
    got = pool.take((4, 8), torch.float32)
    assert got is not None and got.data_ptr() == free_ptr and pool.take((4, 8), torch.float32) is None
    assert alias.data_ptr() and kept_elsewhere  # still alive: they were never in the pool

    # the reader fills a pooled buffer completely: the result equals a fresh read
    save_file({"a": torch.arange(32.0).reshape(4, 8), "b": torch.ones(3)}, str(tmp_path / SINGLE_NAME))
    reader = ShardReader.open(tmp_path)
    given = [got]
    del got
    pool.give(given)
    loaded = reader.load(["a", "b"], pool)
    assert loaded["a"].data_ptr() == free_ptr and pool.nbytes == 0
    assert torch.equal(loaded["a"], torch.arange(32.0).reshape(4, 8)) and torch.equal(loaded["b"], torch.ones(3))


def test_heap_returns_pages_only_past_the_warm_up_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    class Libc:
        calls = 0

        def malloc_trim(self, pad: int) -> int:
            Libc.calls += 1
            rss[0] = after_trim[0]
            return 1

    gb = heap.FREE_BUDGET
    rss, after_trim = [0], [0]
    monkeypatch.setattr(heap, "_rss_bytes", lambda: rss[0])
    h = heap.Heap(Libc())  # type: ignore[arg-type]
    assert heap.WARMUP == 2
    steps = [(3 * gb, 0, False), (2.5 * gb, 0, False),  # warm-up: the mark is the larger, 3
             (2 * gb, 0, False), (3.9 * gb, 0, False), (3.9 * gb, 0, False),  # growth within the budget is kept
             (4.5 * gb, 2.5 * gb, True),  # past it: returned; what is left (2.5) does not lower the mark
             (3.9 * gb, 0, False),  # so the same working set again is kept, not returned every layer
             (4.5 * gb, 4.2 * gb, True),  # 4.2 still in use after a return: the mark rises to it
             (5.1 * gb, 0, False), (5.3 * gb, 4.3 * gb, True)]
    for value, left, trimmed in steps:
        rss[0], after_trim[0], before = int(value), int(left), Libc.calls
        h.trim()
        assert (Libc.calls > before) is trimmed, value / gb
    assert h._high == int(4.3 * gb) and h.trims == 3
    h.trim(force=True)
    assert Libc.calls == 4
