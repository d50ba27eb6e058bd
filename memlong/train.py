"""MemLong stage-2 training: LoRA above the memory layer, long documents streamed in order.

Every step reads the next `accum_blocks` blocks of the current document through `DocumentPass`, which
follows the inference chunk loop exactly (true sinks, warm sliding window, memory = chunks that left the
window, causal `prev_chunk` retrieval query, memory detached and cleared per document), and takes one
optimiser step on their next-token loss, plus `kd_weight` x the KL to a teacher's cached top-k when the
documents carry one (memlong.training.teacher). Documents that carry their frozen lower stack
(memlong.training.cache) are read from the memory layer up; the rest run every layer. `use_memory=False` is the memory-free control (`lora_no_memory`): the
same LoRA training reading the same blocks with the local window only.

A run directory holds `metrics.jsonl` (one line per step / evaluation), `checkpoints/step-N/` (adapter,
optimiser state, mid-document stream state, trainer state) and `LATEST` naming the newest checkpoint.
Resuming restores all of it, so an interrupted run continues with the same weights it would have had.

`load_adapter(model, path)` is what inference uses: it folds a trained adapter into the base weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from memlong.atomic import write_atomic
from memlong.errors import InvalidArgument
from memlong.model import MemLongModel
from memlong.packages import ADAPTERS_DIR
from memlong.training.adapter import (
    AdapterSpec,
    attach_lora,
    check_binding,
    copy_into_lora,
    merge_adapter,
    read_adapter,
    save_adapter,
)
from memlong.training.cache import FrozenDoc
from memlong.training.docpass import DocumentPass, chunk_texts
from memlong.training.teacher import TopK, topk_kl

log = logging.getLogger(__name__)

# Shipped as package data; `--adapter default` loads it when its settings match (see load_adapter).
DEFAULT_ADAPTER = ADAPTERS_DIR / "smollm2-135m-memlong"
# Held-out Shakespeare plays: never trained on, used for every evaluation of the shipped adapters.
HELDOUT_PLAYS = ("hamlet", "macbeth", "the-tempest", "twelfth-night", "julius-caesar")


def resolve_adapter(name_or_path: str | Path) -> Path:
    """An adapter directory, or the name of one shipped in memlong/adapters (e.g. smollm2-135m-memlong)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    shipped = ADAPTERS_DIR / path.name
    if path.name == str(name_or_path) and shipped.is_dir():
        return shipped
    names = sorted(p.name for p in ADAPTERS_DIR.iterdir() if p.is_dir()) if ADAPTERS_DIR.is_dir() else []
    raise InvalidArgument("adapter", f"no adapter directory {path} (shipped adapters: {names})")


def load_adapter(model: MemLongModel, path: str | Path, check_base: bool = True) -> dict:
    """Fold the adapter in directory `path` (or a shipped adapter's name) into `model`'s weights;
    returns its metadata.

    Raises InvalidArgument when the adapter was trained for another base model, memory layer, retrieval
    layers or memory position; warns when the window, chunk or top-k differ from training.
    """
    path = resolve_adapter(path)
    spec, meta, tensors = read_adapter(path)
    check_binding(model, meta, path, check_base=check_base)
    merge_adapter(model, spec, tensors)
    log.info("loaded MemLong adapter %s (%s)", path, meta.get("method", "?"))
    return meta


def maybe_load_default_adapter(model: MemLongModel, enabled: bool = True) -> dict | None:
    """Load the shipped adapter when enabled and trained for this model; else leave the model as is.

    An installation without it is broken (it ships as package data): InvalidArgument, never base
    weights in silence."""
    if not enabled:
        return None
    if not (DEFAULT_ADAPTER / "adapter.json").is_file():
        raise InvalidArgument("adapter", f"the shipped default adapter is missing: {DEFAULT_ADAPTER}")
    try:
        return load_adapter(model, DEFAULT_ADAPTER)
    except InvalidArgument as exc:
        log.warning("not loading the default adapter: %s", exc)
        return None


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the MemLong settings live in the model's MemLongConfig)."""

    use_memory: bool = True  # False: the lora_no_memory control
    block_chunks: int = 1  # chunks per block (>1 only without attention sinks)
    accum_blocks: int = 1  # blocks whose gradients add up to one optimiser step
    kd_weight: float = 0.0  # weight of the KL to the teacher's top-k beside the LM loss (0: LM only)
    device: str = "cpu"
    bf16: bool = False  # autocast the forward to bfloat16 (GPU; LoRA weights and optimiser stay float32)
    lora_r: int = 16
    lora_alpha: float = 32.0
    mem_layer_qo: bool = True  # LoRA on the memory layer's q/o (it is a retrieval layer by default)
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at max_steps
    max_steps: int = 300
    # Time budget of the training steps, summed over resumes (evaluations come on top); 0: none. The
    # learning-rate schedule ends at whichever of max_steps and max_minutes comes first.
    max_minutes: float = 0.0
    grad_clip: float = 1.0
    max_doc_tokens: int = 0  # read at most this many tokens of each document; 0: whole documents
    eval_every: int = 50
    eval_at_start: bool = True  # evaluate before the first step (skip when the baseline is known)
    eval_tokens: int = 4096  # tokens read from the start of each evaluation document
    save_every: int = 25
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_chunks < 1 or self.accum_blocks < 1 or self.max_steps < 1 or self.lr <= 0:
            raise InvalidArgument("train", "block_chunks, accum_blocks, max_steps and lr must be positive")
        if self.kd_weight < 0:
            raise InvalidArgument("kd_weight", "must be >= 0")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidArgument(sorted(unknown)[0], "unknown training setting")
        return cls(**values)


@dataclass
class Document:
    name: str
    tokens: list[int]
    chunk_emb: np.ndarray | None = None  # (n_chunks, dim) retriever embeddings of its whole chunks
    frozen: FrozenDoc | None = None  # its frozen lower stack, cached (then chunk_emb comes from it)
    teacher: TopK | None = None  # a teacher's top-k for every position (distillation)

    def __post_init__(self) -> None:
        if self.frozen is not None and self.chunk_emb is None:
            self.chunk_emb = self.frozen.emb.numpy()


Embed = Callable[[list[str]], np.ndarray]


def embed_documents(
    docs: Sequence[Document], embed: Embed, tokenizer, chunk: int, cache: Path | None
) -> None:
    """Fill each document's chunk embeddings (cached on disk by content when `cache` is given)."""
    import hashlib

    for doc in docs:
        texts = chunk_texts(tokenizer, doc.tokens, chunk)
        path = None
        if cache is not None:
            key = hashlib.sha256(("\x00".join(texts)).encode()).hexdigest()[:16]
            path = cache / f"{doc.name}-{chunk}-{key}.npy"
            if path.is_file():
                doc.chunk_emb = np.load(path, allow_pickle=False)
                continue
        doc.chunk_emb = np.concatenate(
            [embed(texts[i : i + 64]) for i in range(0, len(texts), 64)] or [np.zeros((0, 1), np.float32)]
        )
        if path is not None:
            buf = io.BytesIO()
            np.save(buf, doc.chunk_emb, allow_pickle=False)
            write_atomic(path, buf.getvalue())


def block_loss(
    model: MemLongModel,
    docpass: DocumentPass,
    p: int,
    s: int,
    teacher: TopK | None = None,
    kd_weight: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """(loss, parts) of one block: mean next-token loss, plus kd_weight x the mean KL to the teacher's
    top-k when given. The block's last input may have no target."""
    hidden, targets = docpass.forward(p, s)
    n = len(targets)
    logits = model.logits(hidden[:n]).float()  # (n, V)
    lm = torch.nn.functional.cross_entropy(logits, targets)
    parts = {"lm_loss": float(lm.detach()), "tokens": n}
    if teacher is None or kd_weight == 0:
        return lm, parts
    dev = logits.device
    kl = topk_kl(logits, TopK(teacher.idx[p : p + n].to(dev), teacher.logp[p : p + n].to(dev)))
    parts["kd_kl"] = float(kl.detach())
    return lm + kd_weight * kl, parts


class Trainer:
    """Trains one adapter over `docs` (read in the given order, whole, once) on a MemLong model."""

    def __init__(
        self,
        model: MemLongModel,
        config: TrainConfig,
        docs: Sequence[Document],
        eval_docs: Sequence[Document],
        out_dir: Path,
        extra_meta: dict | None = None,
        prepare: Callable[[Document], None] | None = None,
    ) -> None:
        """prepare(doc), when given, fills a document's cached parts (its frozen lower stack) when it is
        opened; they are dropped again once it has been read, so only one document's stay in memory."""
        self.model, self.config = model, config
        self.prepare = prepare
        self.docs, self.eval_docs = list(docs), list(eval_docs)
        self.out_dir = Path(out_dir)
        self.extra_meta = extra_meta or {}
        self.spec = AdapterSpec.for_model(model, config.lora_r, config.lora_alpha, config.mem_layer_qo)
        model.to(config.device)
        torch.manual_seed(config.seed)  # LoRA's initialisation: the same in every run of one seed
        self.params = attach_lora(model, self.spec)
        model.to(config.device)  # the LoRA modules were created on the CPU
        model.train()
        self.opt = torch.optim.AdamW(
            [p for _, p in self.params], lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0
        )
        self.step = 0
        self.doc_index = 0
        self.tokens_trained = 0
        self.elapsed = 0.0
        self.docpass: DocumentPass | None = None
        if (
            prepare is None
            and config.use_memory
            and any(d.chunk_emb is None for d in [*self.docs, *self.eval_docs])
        ):
            raise InvalidArgument("docs", "training with memory needs chunk embeddings for every document")
        if config.kd_weight and any(d.teacher is None for d in self.docs):
            raise InvalidArgument("docs", "distillation needs the teacher's top-k for every document")

    # -- the loop ---------------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        t = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
        if c.max_minutes:  # a time budget can end the run before max_steps: the schedule ends with it
            t = max(t, min(1.0, self.elapsed / (c.max_minutes * 60)))
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def _pass(self, doc: Document, max_tokens: int, use_memory: bool | None = None) -> DocumentPass:
        if self.prepare is not None:
            self.prepare(doc)
        use_memory = self.config.use_memory if use_memory is None else use_memory
        tokens = doc.tokens[: max_tokens or None]
        c = self.model.config.chunk
        emb = doc.chunk_emb[: len(tokens) // c] if use_memory else None
        frozen = None if doc.frozen is None else doc.frozen.truncated(len(tokens), c)
        return DocumentPass(self.model, tokens, emb, self.config.block_chunks, frozen)

    def _open(self, index: int) -> DocumentPass:
        return self._pass(self.docs[index], self.config.max_doc_tokens)

    def _next_block(self) -> tuple[int, int] | None:
        """(start, length) of the next block to read, opening documents as needed; None at the end."""
        while True:
            if self.docpass is None:
                if self.doc_index >= len(self.docs):
                    return None
                self.docpass = self._open(self.doc_index)
            nxt = next(self.docpass.blocks(), None)
            if nxt is not None:
                return nxt
            if self.prepare is not None:  # read back from the cache when it comes round again
                done = self.docs[self.doc_index]
                done.frozen = done.chunk_emb = None
            self.docpass, self.doc_index = None, self.doc_index + 1

    def _autocast(self):
        return torch.autocast(device_type=torch.device(self.config.device).type, dtype=torch.bfloat16)

    def train_step(self) -> dict | None:
        """`accum_blocks` blocks, one optimiser step; None when every document has been read."""
        c = self.config
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        blocks: list[tuple[dict, float, int, str]] = []  # (parts, loss, start, document) per block
        while len(blocks) < c.accum_blocks:
            nxt = self._next_block()
            if nxt is None:
                break
            p, s = nxt
            doc = self.docs[self.doc_index]
            with self._autocast() if c.bf16 else contextlib.nullcontext():
                loss, parts = block_loss(self.model, self.docpass, p, s, doc.teacher, c.kd_weight)
            (loss * parts["tokens"]).backward()  # summed over tokens; divided by the total below
            blocks.append((parts, float(loss.detach()), p, doc.name))
        if not blocks:
            return None
        n = sum(b[0]["tokens"] for b in blocks)
        for _, q in self.params:
            if q.grad is not None:
                q.grad /= n
        grad_norm = torch.nn.utils.clip_grad_norm_([q for _, q in self.params], c.grad_clip)
        self.opt.step()
        dt = time.perf_counter() - t0
        self.step += 1
        self.tokens_trained += n
        self.elapsed += dt

        def mean(key: str) -> float:
            return sum(b[0][key] * b[0]["tokens"] for b in blocks) / n

        rec = {
            "step": self.step,
            "doc": blocks[0][3],
            "position": blocks[0][2],
            "loss": sum(b[1] * b[0]["tokens"] for b in blocks) / n,
            "lm_loss": mean("lm_loss"),
            "tokens": n,
            "tokens_trained": self.tokens_trained,
            "tok_s": n / dt,
            "lr": self.lr_at(self.step - 1),
            "grad_norm": float(grad_norm),
        }
        if "kd_kl" in blocks[0][0]:
            rec["kd_kl"] = mean("kd_kl")
        return rec

    @torch.no_grad()
    def evaluate(self, use_memory: bool | None = None) -> dict:
        """Mean next-token loss on the first `eval_tokens` of each evaluation document, counted from the
        first token that can have memory (after local_window + chunk tokens), same tokens either way.
        use_memory=False reads without memory (sliding window) whatever the run trains."""
        cfg = self.model.config
        start = cfg.local_window + cfg.chunk
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for doc in self.eval_docs:
            dp = self._pass(doc, self.config.eval_tokens, use_memory)
            for p, s in dp.blocks():
                with self._autocast() if self.config.bf16 else contextlib.nullcontext():
                    hidden, targets = dp.forward(p, s)
                    logits = self.model.logits(hidden[: len(targets)]).float()
                nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none").cpu()  # (s,)
                keep = torch.arange(p + 1, p + 1 + len(targets)) >= start
                total += float(nll[keep].sum())
                count += int(keep.sum())
        self.model.train(was_training)
        loss = total / max(1, count)
        name = "eval" if use_memory in (None, self.config.use_memory) else "eval_sliding"
        return {
            "step": self.step,
            "tokens_trained": self.tokens_trained,
            f"{name}_loss": loss,
            f"{name}_ppl": math.exp(loss),
            "eval_tokens": count,
        }

    def run(self, progress: bool = True) -> dict:
        """Train to max_steps, the time limit or the end of the data; returns the last evaluation."""
        c = self.config
        budget = c.max_minutes * 60 if c.max_minutes else math.inf
        if self.step == 0 and c.eval_at_start:
            self._log(self.evaluate())
            if c.use_memory:  # the base model without memory, on the same tokens: sliding
                self._log(self.evaluate(use_memory=False))
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not progress, desc="train", unit="step")
        last_eval: dict = {}
        stop = "max_steps"
        while self.step < c.max_steps:
            rec = self.train_step()
            if rec is None:
                stop = "data"
                break
            self._log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_s']:.0f}", doc=rec["doc"][:16])
            if self.step % c.eval_every == 0:
                last_eval = self.evaluate()
                self._log(last_eval)
            if self.step % c.save_every == 0:
                self.save_checkpoint()
            if self.elapsed >= budget:
                stop = "time"
                break
        bar.close()
        if not last_eval or last_eval["step"] != self.step:
            last_eval = self.evaluate()
            self._log(last_eval)
        self.save_checkpoint()
        self._log({"step": self.step, "stopped": stop, "tokens_trained": self.tokens_trained})
        return last_eval

    def _log(self, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"time": round(time.time(), 1), **record}) + "\n")

    # -- checkpoints ------------------------------------------------------------------------------------

    def adapter_meta(self) -> dict:
        return {
            "method": "memlong_trained" if self.config.use_memory else "lora_no_memory",
            "training": {
                **asdict(self.config),
                "steps": self.step,
                "tokens_trained": self.tokens_trained,
                "train_seconds": round(self.elapsed, 1),
                "documents_done": [d.name for d in self.docs[: self.doc_index]],
                "document_current": self.docs[self.doc_index].name
                if self.doc_index < len(self.docs)
                else None,
                "eval_documents": [d.name for d in self.eval_docs],
            },
            **self.extra_meta,
        }

    def save_checkpoint(self) -> Path:
        root = self.out_dir / "checkpoints"
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-step-{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(tmp, self.model, self.spec, self.adapter_meta())
        opt = self.opt.state_dict()
        tensors = {f"{i}.{k}": v.cpu().contiguous() for i, st in opt["state"].items() for k, v in st.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        if self.docpass is not None:
            save_file(self.docpass.state(), str(tmp / "stream.safetensors"))
        state = {
            "step": self.step,
            "doc_index": self.doc_index,
            "tokens_trained": self.tokens_trained,
            "elapsed": self.elapsed,
            "param_groups": opt["param_groups"],
            "config": asdict(self.config),
        }
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest = self.out_dir / "LATEST"
        write_atomic(latest, final.name + "\n")
        old = sorted(p for p in root.glob("step-*") if p != final)
        for p in old[: max(0, len(old) - self.config.keep_checkpoints + 1)]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def resume(self, checkpoint: Path | None = None) -> bool:
        """Restore the newest (or the given) checkpoint; False when there is none."""
        if checkpoint is None:
            latest = self.out_dir / "LATEST"
            if not latest.is_file():
                return False
            checkpoint = self.out_dir / "checkpoints" / latest.read_text().strip()
        spec, _, tensors = read_adapter(checkpoint)
        if spec != self.spec:
            raise InvalidArgument("resume", f"{checkpoint} holds a differently shaped adapter")
        copy_into_lora(self.model, self.spec, tensors)
        state = json.loads((checkpoint / "trainer.json").read_text())
        flat = load_file(str(checkpoint / "optimizer.safetensors"))
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            i, name = key.split(".", 1)
            opt_state.setdefault(int(i), {})[name] = value
        self.opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        self.step, self.doc_index = state["step"], state["doc_index"]
        self.tokens_trained, self.elapsed = state["tokens_trained"], state["elapsed"]
        self.docpass = None
        if (checkpoint / "stream.safetensors").is_file() and self.doc_index < len(self.docs):
            self.docpass = self._open(self.doc_index)
            self.docpass.load_state(load_file(str(checkpoint / "stream.safetensors")))
        log.info("resumed from %s at step %d", checkpoint, self.step)
        return True

    def export(self, path: Path) -> None:
        """Write the current adapter (no optimiser or stream state) to `path`."""
        save_adapter(Path(path), self.model, self.spec, self.adapter_meta())
