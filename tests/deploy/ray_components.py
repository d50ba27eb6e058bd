"""Decoder components for Ray tests: the serving tests' tiny random LLaMA (no weights to load)."""

from __future__ import annotations


def tiny():
    """(model, tokenizer, retriever) with chunk 4, window 8, top-k 2; seeded, so replicas agree."""
    import torch

    from tests.factories import RecordingRetriever
    from tests.services.stack import ByteTokenizer, tiny_model

    torch.manual_seed(0)
    return tiny_model(), ByteTokenizer(), RecordingRetriever()
