"""MemLong stage-2 training: LoRA on the layers above the memory layer, read the way inference reads.

- `adapter`: which parameters train, attaching LoRA (peft), saving and loading adapters.
- `docpass`: one document read through the chunk loop's semantics, several chunks per block, with grads.
- `memlong.train`: the trainer (checkpoints, resume, held-out evaluation) and `load_adapter`.
"""
