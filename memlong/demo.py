"""`memlong demo`: the main job. The whole system on one machine, end to end, with honest numbers.

1. Start the embedded stack (ret-mem, decoder with the packaged model, gateway) on loopback ports.
2. Plant a fact (a pass key) deep inside a long book (8k tokens of the King James Bible by default, far
   more than the 1k local window) and ingest it into a session through the gateway.
3. Ask for the fact through the gateway, with memory and without.
4. Perplexity of a held-out passage (the text that follows) with and without memory.
5. Timings.

The decoder reads with per-layer memory by default (every layer stores and reads back its own K/V, no
training needed); `--layout paper` shows MemLong's paper layout on the same weights. Whatever the model
does with its memory is printed as it is. "Without memory" reads the same session with memory_mode OFF:
the session's local window (its last 1,024 tokens, kept by the decoder between calls) and nothing else.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from memlong.data import PASSKEY_QUESTION, book_text, passkey_needle


def register(subparsers: argparse._SubParsersAction) -> None:
    from memlong.flags import add_model_args

    p = subparsers.add_parser("demo", help="the main job: embedded stack, long book, planted fact, answers")
    p.add_argument(
        "--tokens",
        type=int,
        default=8192,
        help="book tokens to ingest (8k by default: the key sits ~5.7k tokens back, far outside the 1k window)",
    )
    p.add_argument("--depth", type=float, default=0.3, help="where the fact sits, as a fraction of the book")
    p.add_argument("--passage", type=int, default=512, help="tokens of held-out passage to score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=None, help="default: a fresh temporary directory")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    add_model_args(p)
    p.set_defaults(func=run)


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from memlong.client import Client
    from memlong.deploy.stack import EmbeddedStack
    from memlong.flags import memlong_config, set_threads

    set_threads(args)
    cfg = memlong_config(args)
    timings: dict[str, float] = {}
    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="memlong-demo-")
        data_dir = Path(tmp.name)
    else:
        data_dir = args.data_dir

    _say("== 1. starting the embedded stack (ret-mem, decoder, gateway) ==")
    t0 = time.perf_counter()
    stack = EmbeddedStack.start(data_dir, cfg, model=args.model, adapter=args.adapter)
    timings["startup_s"] = time.perf_counter() - t0
    for name, where in stack.describe().items():
        _say(f"  {name:8s} {where}")
    _say(f"  MemLong: {cfg.describe()}")
    try:
        result = _demo(
            args, stack, Client(stack.gateway_address, stack.api_key, timeout_s=3600), cfg, timings
        )
    finally:
        stack.stop()
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _demo(args, stack, client, cfg, timings) -> dict:
    tokenizer = stack.decoder.engine.tokenizer

    def n_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    # -- the haystack: a slice of the book at least args.tokens long, a key planted at args.depth ----
    book = book_text("kjv")
    rng = random.Random(args.seed)
    key, needle = passkey_needle(rng)
    chars = int(args.tokens * 4.4)  # ~4 characters per token in the KJV; checked below
    while n_tokens(book[:chars]) < args.tokens:
        chars = int(chars * 1.1)
    hay = book[:chars]
    cut = hay.rfind("\n", 0, int(len(hay) * args.depth))
    text = hay[:cut] + needle + hay[cut:]
    passage_chars = int(args.passage * 4.4)
    passage = book[chars : chars + passage_chars]
    needle_pos = n_tokens(hay[:cut])  # token offset of the fact: it lands in chunk needle_pos // chunk
    needle_chunks = {needle_pos // cfg.chunk, (needle_pos + n_tokens(needle)) // cfg.chunk}

    _say(
        f"\n== 2. ingesting {len(text.encode()) / 1e3:.0f} kB of the King James Bible with a pass key planted "
        f"at {args.depth:.0%} depth =="
    )
    session = client.create_session("kjv-demo")
    t0 = time.perf_counter()
    client.append(session.session_id, text, progress=True)
    timings["ingest_s"] = time.perf_counter() - t0
    s = client.get_session(session.session_id)
    timings["ingest_tokens_per_s"] = s.tokens / timings["ingest_s"]
    _say(
        f"  {s.tokens} tokens -> {s.chunks} chunks in memory on {s.shard} in {timings['ingest_s']:.1f} s "
        f"({timings['ingest_tokens_per_s']:.0f} tokens/s); the key {key} sits in chunk(s) {sorted(needle_chunks)}"
    )

    _say("\n== 3. asking for the fact through the gateway ==")
    _say(f"  prompt: {PASSKEY_QUESTION.strip()!r}")
    answers = {}
    for mode in ("required", "off"):
        a = client.ask(session.session_id, PASSKEY_QUESTION, max_new_tokens=10, memory=mode)
        found = needle_chunks & set(a.memory.retrieved_ids)
        answers[mode] = {
            "answer": a.text,
            "correct": key in a.text,
            "ttft_s": a.ttft_s,
            "total_s": a.total_s,
            "tokens_per_s": len(a.token_ids) / a.total_s,
            "fact_chunk_retrieved": bool(found),
            "note": a.memory.note,
        }
        label = "with memory   " if mode == "required" else "without memory"
        _say(
            f"  {label}: {a.text.strip()!r}  -> {'CORRECT' if key in a.text else 'wrong'} "
            f"(TTFT {a.ttft_s:.2f} s, {len(a.token_ids) / a.total_s:.1f} tokens/s)"
        )
        if mode == "required":
            _say(
                f"                  retrieval found the fact's chunk: {'yes' if found else 'no'} "
                f"(retrieved {sorted(set(a.memory.retrieved_ids))})"
            )

    _say(f"\n== 4. perplexity of the held-out passage that follows the book ({n_tokens(passage)} tokens) ==")
    ppl = {}
    for mode in ("required", "off"):
        t0 = time.perf_counter()
        r = client.score(session.session_id, passage, memory=mode)
        took = time.perf_counter() - t0
        ppl[mode] = {
            "perplexity": r.perplexity,
            "scored_tokens": r.scored_tokens,
            "seconds": took,
            "retrievals": r.memory.retrievals,
            "retrieval_wait_s": r.memory.retrieval_wait_s,
            "retrieval_total_s": r.memory.retrieval_total_s,
            "compute_s": r.memory.compute_s,
        }
        label = "with memory   " if mode == "required" else "without memory"
        _say(
            f"  {label}: perplexity {r.perplexity:.2f} over {r.scored_tokens} tokens "
            f"({r.scored_tokens / took:.0f} tokens/s; {r.memory.retrievals} retrievals, waited "
            f"{r.memory.retrieval_wait_s:.2f} s of {r.memory.retrieval_total_s:.2f} s retrieval)"
        )

    _say("\n== 5. timings ==")
    for k, v in timings.items():
        _say(f"  {k:22s} {v:.2f}")
    verdict = (
        answers["required"]["correct"] and not answers["off"]["correct"],
        ppl["required"]["perplexity"] < ppl["off"]["perplexity"],
    )
    _say(
        f"\nMemory {'answered' if verdict[0] else 'did not answer'} the fact the window alone could not, and "
        f"{'lowered' if verdict[1] else 'did not lower'} the held-out perplexity "
        f"({ppl['required']['perplexity']:.2f} with, {ppl['off']['perplexity']:.2f} without)."
    )
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    return {
        "settings": settings,
        "memlong": cfg.__dict__,
        "key": key,
        "answers": answers,
        "perplexity": ppl,
        "timings": timings,
    }
