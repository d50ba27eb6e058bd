"""MemLong stage-2 training: LoRA on the layers above the memory layer, read the way inference reads.

- `adapter`: which parameters train, attaching LoRA (peft), saving and loading adapters.
- `docpass`: one document read through the chunk loop's semantics, block by block, with grads.
- `cache`: the frozen lower stack's output per document (states entering the memory layer, its K/V,
  retrieval vectors), computed once and kept on disk.
- `teacher`: a teacher's next-token top-k per document (distillation targets) and the KL to them.
- `card`: the card (data, tokens, settings, held-out curve) written beside a run's adapter.
- `memlong.train`: the trainer (checkpoints, resume, held-out evaluation) and `load_adapter`;
  `memlong.train_cli`: `memlong train run|export|eval` and the cpu/gpu recipes.
"""
