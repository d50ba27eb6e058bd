"""The retriever: all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised, 384-d)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from memlong.weights import retriever_dir


class Retriever:
    """Embeds chunk texts and retrieval queries. Inner product of outputs is cosine similarity."""

    def __init__(self, path: str | Path | None = None, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        directory = Path(path) if path else retriever_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModel.from_pretrained(directory).eval()
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32, unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        hidden = self.model(**batch).last_hidden_state  # (n, T, dim)
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)
