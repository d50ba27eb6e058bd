"""Compact K/V records: sizes, round-trip error bounds, and the plain codec unchanged."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from memlong import kvcodec
from memlong.dtypes import KV_DTYPES, torch_dtype


def _kv(n: int = 3, layers: int = 2, h: int = 3, c: int = 16, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, layers, h, c, d, generator=g) * 2
    k[:, :, :, :, 1] *= 40  # an outlier key channel
    v = torch.randn(n, layers, h, c, d, generator=g)
    v[:, :, :, 3] *= 30  # an outlier value token
    v[0, 0, 0] = 0  # an all-zero slice
    return k.bfloat16().float(), v.bfloat16().float()


@pytest.mark.parametrize("codec", kvcodec.CODECS)
@pytest.mark.parametrize("paper", [False, True])
def test_sizes_and_shapes(codec: str, paper: bool) -> None:
    k, v = _kv(layers=1 if paper else 2)
    shape = (2, 3, 16, 8) if paper else (2, 2, 3, 16, 8)
    rec = kvcodec.encode(k, v, "bfloat16", codec)
    assert rec.shape == (3, kvcodec.record_bytes(shape, "bfloat16", codec))
    out = kvcodec.decode(rec[None], shape, "bfloat16", codec)
    assert out.shape == (1, 3, *shape)


@pytest.mark.parametrize(("codec", "ratio"), [("int8", 0.512), ("fp8", 0.5)])
def test_bytes_beside_bfloat16_for_smollm2(codec: str, ratio: float) -> None:
    shape = (30, 2, 3, 128, 64)
    full = kvcodec.record_bytes(shape, "bfloat16", "none")
    assert full == 2949120
    assert kvcodec.record_bytes(shape, "bfloat16", codec) / full == pytest.approx(ratio, abs=5e-4)


def test_none_is_exact() -> None:
    k, v = _kv()
    out = kvcodec.decode(kvcodec.encode(k, v, "bfloat16", "none"), (2, 2, 3, 16, 8), "bfloat16", "none")
    assert torch.equal(out[:, :, 0].float(), k) and torch.equal(out[:, :, 1].float(), v)


@pytest.mark.parametrize("codec", kvcodec.CODECS)
def test_read_only_records_decode_quietly_and_alike(codec: str) -> None:
    """Records retrieved through shared memory are read-only views: decoding them warns of nothing and
    gives what the same bytes give when writable."""
    k, v = _kv()
    shape = (2, 2, 3, 16, 8)
    records = kvcodec.encode(k, v, "bfloat16", codec)
    frozen = records.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = kvcodec.decode(frozen, shape, "bfloat16", codec)
    assert torch.equal(got, kvcodec.decode(records, shape, "bfloat16", codec))


def test_int8_error_within_half_a_step_per_channel_and_token() -> None:
    k, v = _kv()
    out = kvcodec.decode(kvcodec.encode(k, v, "bfloat16", "int8"), (2, 2, 3, 16, 8), "bfloat16", "int8")
    step_k = k.abs().amax(dim=3, keepdim=True) / 127  # (n, L, H, 1, D)
    step_v = v.abs().amax(dim=4, keepdim=True) / 127  # (n, L, H, c, 1)
    assert ((out[:, :, 0] - k).abs() <= 0.57 * step_k + 1e-12).all()
    assert ((out[:, :, 1] - v).abs() <= 0.57 * step_v + 1e-12).all()
    assert torch.equal(out[0, 0, 1, 0], torch.zeros(16, 8))  # the zero slice stays zero
    rel = (out[:, :, 0] - k).norm() / k.norm()
    assert rel < 0.01


def test_fp8_error_relative_plus_subnormal_floor() -> None:
    k, v = _kv()
    kv = torch.stack([k, v], dim=2)
    out = kvcodec.decode(kvcodec.encode(k, v, "bfloat16", "fp8"), (2, 2, 3, 16, 8), "bfloat16", "fp8")
    scale = kv.abs().amax(dim=(4, 5), keepdim=True) / 448
    assert ((out - kv).abs() <= kv.abs() * 2**-4 + scale * 2**-9 + 1e-12).all()
    assert (out - kv).norm() / kv.norm() < 0.05


@pytest.mark.parametrize("name", KV_DTYPES)
def test_each_kv_dtype_has_the_torch_dtype_of_its_name_and_record_width(name: str) -> None:
    dt = torch_dtype(name)
    assert dt == getattr(torch, name)
    assert torch.empty(0, dtype=dt).element_size() == KV_DTYPES[name].itemsize


def test_an_unlisted_dtype_has_no_torch_dtype() -> None:
    with pytest.raises(KeyError):
        torch_dtype("int8")


def test_unknown_codec_is_refused() -> None:
    k, v = _kv()
    with pytest.raises(Exception, match="kv_codec"):
        kvcodec.encode(k, v, "bfloat16", "int4")


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_a_reader_with_compact_records_scores_close_to_plain_ones(codec: str) -> None:
    from memlong.chunkloop import Reader
    from memlong.dtypes import record_bytes
    from memlong.memory import MemoryConfig, SessionMemory
    from memlong.model import MemLongModel
    from tests.factories import RecordingRetriever, TinyTokenizer, tiny_memlong

    plain = tiny_memlong(chunk=4, window=8)
    compact = MemLongModel(plain.hf, dataclasses.replace(plain.config, kv_codec=codec))
    toks = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(3)).tolist()
    scores, stored = [], []
    for model in (plain, compact):
        retriever = RecordingRetriever()
        rb = record_bytes(model.kv_record_shape, "float32", model.config.kv_codec)
        memory = SessionMemory(
            MemoryConfig(dim=model.retrieval_dim(retriever.dim), record_bytes=rb, memory_size=64)
        )
        reader = Reader(model, retriever, TinyTokenizer(), memory)
        scores.append(reader.score(toks)[1:])
        stored.append(reader.stats.bytes_retrieved)
        assert reader.stats.retrievals > 0
    torch.testing.assert_close(scores[1], scores[0], atol=0.05, rtol=0)  # log-probs, tiny random model
    assert stored[1] < stored[0] / 2  # float32 plain records here (the scales weigh more at chunk 4)
