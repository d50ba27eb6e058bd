"""Client verbs: `memlong session create|list|delete`, `ingest FILE`, `ask`, `score`, and `demo`.

The gateway address comes from --gateway or $MEMLONG_GATEWAY (default 127.0.0.1:50051); the API key
from --api-key, $MEMLONG_API_KEY, or the embedded default's key file in the data directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", default=os.environ.get("MEMLONG_GATEWAY", "127.0.0.1:50051"))
    p.add_argument("--api-key", default=os.environ.get("MEMLONG_API_KEY"))
    p.add_argument("--data-dir", type=Path, default=None, help="where `memlong up` keeps its key file")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per call")


def _client(args: argparse.Namespace):
    from memlong.client import Client
    from memlong.deploy.installation import default_data_dir, local_api_key

    key = args.api_key
    if not key:
        data_dir = args.data_dir or default_data_dir()
        if not (data_dir / "api_keys.json").is_file():
            raise FileNotFoundError("no API key: pass --api-key, set MEMLONG_API_KEY, or start `memlong up`")
        key = local_api_key(data_dir)
    return Client(args.gateway, key, timeout_s=args.timeout)


def cmd_session(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.session_command == "create":
        s = client.create_session(args.name, args.retrieval)
        print(s.session_id)
    elif args.session_command == "list":
        for s in client.list_sessions():
            print(
                f"{s.session_id}  {s.name or '-':20s} {s.tokens:>10} tokens  {s.text_bytes:>10} bytes  "
                f"retrieval {s.retrieval}"
            )
    else:
        client.delete_session(args.session)
        print(f"deleted {args.session}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    client = _client(args)
    text = args.file.read_bytes()
    last = client.append(args.session, text, progress=not args.quiet)
    s = client.get_session(args.session)
    print(f"{args.session}: {last.text_bytes} bytes, {s.tokens} tokens, {s.chunks} chunks in memory")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    client = _client(args)
    out = sys.stdout
    for tok in client.generate(
        args.session,
        args.question,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        memory=args.memory,
    ):
        out.write(tok.text)
        out.flush()
        last = tok
    out.write("\n")
    m = last.memory
    print(f"[memory used: {m.memory_used}; retrievals {m.retrievals}; {m.note}]", file=sys.stderr)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    client = _client(args)
    text = args.file.read_bytes() if args.file else args.text.encode()
    r = client.score(args.session, text, memory=args.memory)
    m = r.memory
    print(
        f"perplexity {r.perplexity:.3f} over {r.scored_tokens} tokens; memory used: {m.memory_used} {m.note}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    session = subparsers.add_parser("session", help="create, list or delete sessions")
    sub = session.add_subparsers(dest="session_command", required=True)
    create = sub.add_parser("create")
    create.add_argument("--name", default="")
    create.add_argument(
        "--retrieval",
        choices=("text", "keys"),
        default="",
        help="what the session's chunks are found by (default: the decoder's)",
    )
    sub.add_parser("list")
    delete = sub.add_parser("delete")
    delete.add_argument("session")
    for p in (create, sub.choices["list"], delete):
        _connection(p)
        p.set_defaults(func=cmd_session)

    ingest = subparsers.add_parser("ingest", help="append a UTF-8 text file to a session's memory")
    ingest.add_argument("file", type=Path)
    ingest.add_argument("--session", required=True)
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")
    _connection(ingest)
    ingest.set_defaults(func=cmd_ingest)

    ask = subparsers.add_parser("ask", help="generate an answer after the session's memory")
    ask.add_argument("question")
    ask.add_argument("--session", required=True)
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--memory", choices=("required", "if_available", "off"), default="required")
    _connection(ask)
    ask.set_defaults(func=cmd_ask)

    score = subparsers.add_parser("score", help="perplexity of a text read after the session's memory")
    score.add_argument("file", type=Path, nargs="?")
    score.add_argument("--text", default="")
    score.add_argument("--session", required=True)
    score.add_argument("--memory", choices=("required", "if_available", "off"), default="required")
    _connection(score)
    score.set_defaults(func=cmd_score)

    from memlong import demo

    demo.register(subparsers)
