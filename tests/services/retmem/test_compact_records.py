"""Sessions of compact K/V records (kv_codec int8/fp8): stored and moved as opaque bytes of their own
size, the codec kept in the spec across the wire and restarts."""

from __future__ import annotations

import numpy as np
import pytest

from memlong.errors import InvalidArgument
from memlong.services.retmem.client import RetMemClient
from memlong.services.retmem.store import SessionSpec

from .servers import chunks


def _spec(codec: str) -> SessionSpec:
    return SessionSpec(dim=16, kv_shape=(2, 2, 1, 8, 4), kv_dtype="bfloat16", memory_size=32, kv_codec=codec)


@pytest.mark.parametrize(
    ("codec", "size"), [("none", 256), ("int8", 2 * 64 + 2 * 2 * (4 + 8)), ("fp8", 128 + 16)]
)
def test_record_sizes(codec: str, size: int) -> None:
    assert _spec(codec).record_bytes == size


def test_an_unknown_codec_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="spec.kv_codec"):
        _spec("int4")


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_compact_records_round_trip_over_grpc(client: RetMemClient, codec: str) -> None:
    spec, rng = _spec(codec), np.random.default_rng(0)
    client.create_session("c", spec)
    assert client.info("c").spec == spec  # the codec survives the wire
    ids, emb, rec, lengths = chunks(rng, spec, 0, 6)
    assert client.append("c", ids, emb, rec, lengths) == 6
    got = client.search("c", emb[[2]], 3)
    i = list(got.ids[0]).index(2)
    assert got.records.shape == (1, 3, spec.record_bytes)
    assert np.array_equal(got.records[0, i], rec[2])
    assert np.array_equal(client.fetch("c", ids)[0], rec)
    with pytest.raises(InvalidArgument):  # typed K/V are not a compact record
        client.append("c", ids[:1] + 10, emb[:1], np.zeros((1, *spec.kv_shape), np.uint16), lengths[:1])
