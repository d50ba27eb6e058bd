"""The MemLong model flags every command shares (`memlong eval`, `up`, `demo`, `decoder serve`, `train`),
and the config built from them: the one place command-line settings become a `MemLongConfig`."""

from __future__ import annotations

import argparse

from memlong.config import READERS, MemLongConfig
from memlong.dtypes import KV_CODECS


def ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of whole numbers, "k" meaning 1024: '2k,4096' -> (2048, 4096)."""
    return tuple(int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in text.strip().split(","))


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names, empty items dropped: 'full,,sliding' -> ('full', 'sliding'); '' -> ()."""
    return tuple(x for x in text.split(",") if x)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model flags; their defaults are MemLongConfig's (defined there once)."""
    d = MemLongConfig
    g = p.add_argument_group("MemLong settings")
    g.add_argument("--model", default=None, help="HF LLaMA-family checkpoint dir (default: packaged SmolLM2)")
    g.add_argument(
        "--adapter",
        default=None,
        help="MemLong LoRA adapter folded into the weights: a dir (from `memlong train`), the name of a "
        "shipped one (smollm2-135m-memlong, smollm2-135m-lora-no-memory) or `default` (the shipped one "
        "when it matches the settings); refused when it was trained for another base model, memory "
        "layer, retrieval layers or memory position",
    )
    g.add_argument(
        "--layout",
        choices=("per_layer", "paper"),
        default=None,
        help="memory layout: per_layer (every memory layer stores and reads its own K/V; training-free, the "
        "default) or paper (one memory layer read by the retrieval layers; the default with --adapter)",
    )
    g.add_argument("--mem-layers", default="", help="per_layer: comma-separated memory layers (default: all)")
    g.add_argument("--mem-layer", type=int, default=d.mem_layer, help="paper layout: the memory layer")
    g.add_argument(
        "--ret-layers",
        default=",".join(map(str, d.ret_attn_layers)),
        help="paper layout: comma-separated retrieval layers",
    )
    g.add_argument("--chunk", type=int, default=d.chunk)
    g.add_argument("--top-k", type=int, default=d.top_k)
    g.add_argument("--local-window", type=int, default=d.local_window)
    g.add_argument("--memory-size", type=int, default=d.memory_size, help="memory tokens per session")
    g.add_argument(
        "--mem-position",
        choices=("zero", "prefix"),
        default=d.mem_position,
        help="where memory keys sit: zero (unrotated, position 0; the default) or prefix (as the text "
        "just before the window)",
    )
    g.add_argument(
        "--retrieval",
        choices=("text", "keys"),
        default=d.retrieval,
        help="what chunks are found by: text (the retriever's embedding of the chunk text; MemLong) or keys "
        "(the model's own attention keys; LongMem's token-to-chunk). The default for new sessions",
    )
    g.add_argument(
        "--key-layers",
        default="",
        help="retrieval by keys: comma-separated layers (default: the two stored layers at 40%% depth)",
    )
    g.add_argument(
        "--prompt-query-tokens",
        type=int,
        default=d.prompt_query_tokens,
        help="a prompt's retrieval queries with its last N tokens (0: its last chunk)",
    )
    g.add_argument(
        "--prompt-top-k",
        type=int,
        default=d.prompt_top_k,
        help="chunks a prompt's own retrieval reads (0: --top-k)",
    )
    for name, text in (
        (
            "prompt_window",
            "a prompt's chunks inside the window its continuation reads retrieve with its query too",
        ),
        (
            "prompt_insert",
            "a prompt's retrieved chunks read as text inserted before where it first reads them",
        ),
        ("ingest_memory", "ingest reads memory as scoring does (--no-ingest-memory: its local window only)"),
    ):
        flag = "--" + name.replace("_", "-")
        g.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(d, name), help=text)
    g.add_argument(
        "--reader",
        choices=READERS,
        default=None,
        help="who reads memory: stream (the text's own pass) or side (a second pass; the text's K/V and "
        f"memory stay memory-free). Default: {d.reader} (per-layer layout), stream (paper layout)",
    )
    g.add_argument(
        "--kv-codec",
        choices=KV_CODECS,
        default=d.kv_codec,
        help="how stored K/V are held: none (kv dtype values), int8 or fp8 (compact, about half the bytes)",
    )
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")


def memlong_config(args: argparse.Namespace, default_layout: str = "per_layer") -> MemLongConfig:
    """MemLongConfig from the model flags. The layout defaults to per_layer, or paper when an adapter
    (trained for the paper layout) is given."""
    layout = args.layout or ("paper" if getattr(args, "adapter", None) else default_layout)
    return MemLongConfig(
        layout=layout,
        mem_layers=tuple(int(x) for x in args.mem_layers.split(",") if x),
        mem_layer=args.mem_layer,
        ret_attn_layers=tuple(int(x) for x in args.ret_layers.split(",")),
        chunk=args.chunk,
        top_k=args.top_k,
        local_window=args.local_window,
        memory_size=args.memory_size,
        mem_position=args.mem_position,
        retrieval=args.retrieval,
        kv_codec=getattr(args, "kv_codec", "none"),
        prompt_query_tokens=args.prompt_query_tokens,
        prompt_top_k=args.prompt_top_k,
        prompt_window=args.prompt_window,
        prompt_insert=args.prompt_insert,
        ingest_memory=args.ingest_memory,
        reader=args.reader or (MemLongConfig.reader if layout == "per_layer" else "stream"),
        **({"key_layers": tuple(int(x) for x in args.key_layers.split(",") if x)} if args.key_layers else {}),
    )


def set_threads(args: argparse.Namespace) -> None:
    """torch threads from --threads (0: leave torch's default, all cores); FAISS one thread, always: its
    searches here are one query row per chunk, where more OpenMP threads only spin beside the model."""
    import torch

    from memlong.memory import set_faiss_threads

    if args.threads:
        torch.set_num_threads(args.threads)
    set_faiss_threads(1)
