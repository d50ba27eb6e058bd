"""The element types a chunk's K/V may be stored in: the one list, with the numpy dtype a record's
bytes are kept in (bfloat16 as raw little-endian uint16: numpy has no bfloat16). The model computes in
the torch dtype of the same name."""

from __future__ import annotations

import numpy as np

KV_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype("<u2"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}
