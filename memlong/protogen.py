"""Generate the Python protobuf / gRPC modules from `proto/`.

    python -m memlong.protogen            # regenerate into the repository
    python -m memlong.protogen --out DIR  # generate elsewhere (the staleness test does this)

The generated `*_pb2.py`, `*_pb2_grpc.py` and `*_pb2.pyi` files land in `memlong/api/<service>/v1/`
(from `proto/memlong/api/<service>/v1/`; the proto packages stay `memlong.<service>.v1`, so the names
on the wire do not change) and are committed; a test regenerates them into a temporary directory and
fails when the committed copies differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """All .proto files under `root`, sorted so that output is deterministic."""
    return sorted(root.rglob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Run grpc_tools.protoc over every proto; return the generated files (relative to out_dir)."""
    from grpc_tools import protoc  # build-time dependency only

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(root)) for p in proto_files(root)]
    include = str(Path(protoc.__file__).parent / "_proto")  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    stems = [f[: -len(".proto")] for f in files]
    return [Path(s + suffix) for s in stems for suffix in GENERATED_SUFFIXES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
