"""In-context learning with demonstrations in memory (SST-2, MR, SST-5, Subj).

Every prompt ends with the same local demonstrations and the test sentence:

    Review: <demo sentence>\nSentiment: <label word>\n\n ... Review: <test sentence>\nSentiment:

and the prediction is the label word whose first token the model finds most likely next, scored three
ways (every one from the same log-probs, for both methods alike):

- `raw`: the most likely label token as it comes.
- `cf` (contextual calibration, Zhao et al. 2021): each label's probability divided by its mean
  probability when the test sentence is replaced by content-free strings (`CONTENT_FREE`), read with
  the same demonstrations by the same method (memory retrieving with that prompt).
- `batch` (batch calibration, Zhou et al. 2023): divided by the label's mean probability over the
  test prompts of that (task, seed, method); no label is used. The headline `accuracy`.

A small model's raw prediction leans hard on one label (SST-2, seed 0, 40 held-out sentences that are
not scored: "positive" for 34 without memory and 36 with, 23 of them positive), so raw accuracy
measures mostly the label prior; calibrating takes the prior out of both methods the same way. The
probabilities are renormalised over the label tokens before calibrating.

`none` reads only that prompt; `memory` first ingests `memory_demos` further demonstrations of the same
seed into memory (their K/V and embeddings, as any text), then reads the same prompt with retrieval, so
both methods are scored on the same prompts and the only difference is what sits in memory.

Test split (fixed, recorded in the results): SST-2 uses its dev file; MR, SST-5 and Subj, which ship
a train file only, hold out `test_pool` examples chosen by a seeded shuffle (seed `split_seed`) and draw
demonstrations from the rest. `test_examples` of the held-out examples are scored, the same ones for
every seed and method; each seed draws its own local and memory demonstrations.
"""

from __future__ import annotations

import csv
import gzip
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import torch
from tqdm import tqdm

from memlong.chunkloop import Reader
from memlong.errors import InvalidArgument
from memlong.eval.common import Stack, machine_info, markdown_table, write_json
from memlong.packages import ICL_DATA_DIR

TASKS = {  # task: (label words by label id, what the label names)
    "sst-2": (("negative", "positive"), "Sentiment"),
    "mr": (("negative", "positive"), "Sentiment"),
    "sst-5": (("terrible", "bad", "okay", "good", "great"), "Sentiment"),
    "subj": (("subjective", "objective"), "Type"),
}
CONTENT_FREE = ("N/A", "", "[MASK]")  # stand-ins for the test sentence in contextual calibration
SCORINGS = ("raw", "cf", "batch")


@dataclass(frozen=True)
class ICLSettings:
    data_dir: str = str(ICL_DATA_DIR)  # shipped in the package (gzip); any folder of the same layout
    tasks: tuple[str, ...] = ("sst-2", "mr", "sst-5", "subj")
    seeds: tuple[int, ...] = (0, 1, 2)
    local_demos: int = 4
    memory_demos: int = 200
    test_examples: int = 60
    test_pool: int = 500
    split_seed: int = 1234
    methods: tuple[str, ...] = ("none", "memory")  # "none" reads no memory; drop it to compare readings


def _open_text(path: Path) -> IO[str]:
    """`path`, or its gzip-compressed `path.gz` (how the package ships the data)."""
    if not path.is_file() and path.with_name(path.name + ".gz").is_file():
        return gzip.open(path.with_name(path.name + ".gz"), "rt", newline="", encoding="utf-8")
    return open(path, newline="", encoding="utf-8")


def _rows(path: Path) -> list[tuple[str, int]]:
    """(sentence, label) pairs of one ICL file (or its .gz): TSV with a header (SST-2) or label,sentence
    CSV."""
    with _open_text(path) as f:
        if path.suffix == ".tsv":
            reader = csv.reader(f, delimiter="\t")
            next(reader)
            return [(s.strip(), int(y)) for s, y in reader]
        return [(s.strip(), int(y)) for y, s in csv.reader(f)]


def load_task(data_dir: Path, task: str, settings: ICLSettings) -> tuple[list, list]:
    """(demonstration pool, test examples) of a task, split as the module docstring says."""
    folder = data_dir / task
    if not folder.is_dir():
        raise InvalidArgument("data_dir", f"no ICL task folder {folder} (expected sst-2, mr, sst-5, subj)")
    train = _rows(folder / ("train.tsv" if task == "sst-2" else "train.csv"))
    if task == "sst-2":
        test = _rows(folder / "dev.tsv")
        random.Random(settings.split_seed).shuffle(test)
    else:
        random.Random(settings.split_seed).shuffle(train)
        test, train = train[: settings.test_pool], train[settings.test_pool :]
    return train, test[: settings.test_examples]


def _demo(sentence: str, label: str, field: str) -> str:
    return f"Review: {sentence}\n{field}: {label}\n\n"


def _label_tokens(stack: Stack, words: tuple[str, ...]) -> list[int]:
    """The first token of each label word as it follows ': ' (must differ between labels)."""
    first = [stack.encode(" " + w)[0] for w in words]
    if len(set(first)) != len(first):
        raise InvalidArgument("labels", f"label words share a first token: {words}")
    return first


def run_icl(
    stack: Stack, settings: ICLSettings, on_task: Callable[[list[dict]], None] | None = None
) -> list[dict]:
    """One record per (task, method, seed) with its accuracy, plus a mean/spread record per (task, method)."""
    records: list[dict] = []
    data_dir = Path(settings.data_dir)
    if not settings.methods or not set(settings.methods) <= {"none", "memory"}:
        raise InvalidArgument("methods", f"none and/or memory, not {list(settings.methods)}")
    for task in settings.tasks:
        if task not in TASKS:
            raise InvalidArgument("tasks", f"unknown task {task!r}; known: {sorted(TASKS)}")
        words, field = TASKS[task]
        pool, test = load_task(data_dir, task, settings)
        label_ids = _label_tokens(stack, words)
        per_method = {m: {k: [] for k in SCORINGS} for m in settings.methods}
        for seed in settings.seeds:
            rng = random.Random(f"{task}:{seed}")
            demos = rng.sample(pool, settings.local_demos + settings.memory_demos)
            local, in_memory = demos[: settings.local_demos], demos[settings.local_demos :]
            prefix = "".join(_demo(s, words[y], field) for s, y in local)
            base = stack.reader(with_memory=True)
            base.ingest(stack.encode("".join(_demo(s, words[y], field) for s, y in in_memory)))
            base.flush()  # memory holds the demonstrations; the local window starts empty
            methods = settings.methods
            logps: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
            retrievals = dict.fromkeys(methods, 0)

            for sentence, _ in tqdm(test, desc=f"icl {task} seed {seed}", unit="ex"):
                prompt = stack.encode(prefix + f"Review: {sentence}\n{field}:")
                for method in methods:
                    logp, n_ret = _label_logp(base, prompt, method, label_ids)
                    logps[method].append(logp)
                    retrievals[method] += n_ret
            labels = torch.tensor([y for _, y in test])
            for method in methods:
                free = [stack.encode(prefix + f"Review: {c}\n{field}:") for c in CONTENT_FREE]
                cf = torch.stack([_label_logp(base, p, method, label_ids)[0] for p in free])
                scores = calibrated(torch.stack(logps[method]), cf)
                accs = {k: float((v.argmax(1) == labels).double().mean()) for k, v in scores.items()}
                for k, acc in accs.items():
                    per_method[method][k].append(acc)
                row = _record(task, method, seed, settings, accs, len(test), base)
                raw_pred = scores["raw"].argmax(1)
                records.append(
                    {
                        **row,
                        "retrievals_per_example": retrievals[method] / len(test),
                        "predicted_raw": [int((raw_pred == i).sum()) for i in range(len(words))],
                        "gold": [int((labels == i).sum()) for i in range(len(words))],
                    }
                )
        for method, by_scoring in per_method.items():
            mean = {k: statistics.mean(v) for k, v in by_scoring.items()}
            spread = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in by_scoring.items()}
            records.append(
                {
                    **_record(task, method, "mean", settings, mean, len(test), None),
                    **{f"stdev_{k}": v for k, v in spread.items()},
                    "stdev": spread["batch"],
                    "seeds": list(settings.seeds),
                }
            )
        if on_task is not None:
            on_task(records)
    return records


def _label_logp(
    base: Reader, prompt: list[int], method: str, label_ids: list[int]
) -> tuple[torch.Tensor, int]:
    """(label tokens' log-probs after the prompt, retrievals made) for a fork of `base` reading the
    prompt with its memory ("memory") or none."""
    reader = base.fork(base.memory if method == "memory" else None)
    reader.read_prompt(prompt)  # the prompt is given; only its label is predicted
    return reader.next_logprobs()[label_ids], reader.stats.retrievals


def calibrated(logp: torch.Tensor, content_free: torch.Tensor) -> dict[str, torch.Tensor]:
    """Label scores (n, labels) of each scoring in SCORINGS from the label tokens' log-probs (n, labels)
    and those of the content-free prompts (m, labels): log-probs renormalised over the labels, less the
    log of the calibration prior (a mean probability; see the module docstring)."""

    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x.float(), dim=-1)

    lp = norm(logp)
    prior_cf = norm(content_free).exp().mean(0).log()
    prior_batch = lp.exp().mean(0).log()
    return {"raw": lp, "cf": lp - prior_cf, "batch": lp - prior_batch}


def _record(task, method, seed, settings: ICLSettings, accs: dict[str, float], n: int, base) -> dict:
    row = {
        "task": task,
        "method": method,
        "local_demos": settings.local_demos,
        "memory_demos": settings.memory_demos if method == "memory" else 0,
        "seed": seed,
        "test_examples": n,
        "accuracy": accs["batch"],
        **{f"accuracy_{k}": accs[k] for k in SCORINGS},
        "chance": 1 / len(TASKS[task][0]),
    }
    if base is not None and method == "memory":
        row["memory_chunks"] = len(base.memory)
    return row


def write_icl(out_dir: Path, settings: ICLSettings, records: list[dict], extra: dict) -> None:
    write_json(out_dir / "icl.json", records)
    meta = {
        "settings": asdict(settings),
        "machine": machine_info(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(out_dir / "icl_meta.json", {**meta, **extra})
    summary = [
        {**r, **{k: f"{r[f'accuracy_{k}']:.3f} ± {r[f'stdev_{k}']:.3f}" for k in SCORINGS}}
        for r in records
        if r["seed"] == "mean"
    ]
    cols = ["task", "method", "local_demos", "memory_demos", "test_examples", *SCORINGS, "chance"]
    (out_dir / "icl.md").write_text(
        f"Accuracy, mean ± sample stdev over seeds {list(settings.seeds)}; {settings.test_examples} test "
        "examples per task (the same for every seed and method). `batch`: batch-calibrated (the "
        "headline `accuracy` in icl.json); `cf`: contextually calibrated with content-free inputs "
        f"{list(CONTENT_FREE)}; `raw`: the most likely label token, uncalibrated (see memlong/eval/icl.py)."
        "\n\n" + markdown_table(summary, cols)
    )
