"""The bundled trainer: pretrains a small GLM-4.1V-shaped model on the pipeline's WebDataset shards.

Never imports pyspark. Where things are:
  shards.py      shard lists (index.json / sizes.json), local and s3:// reading
  images.py      GLM-4.1V image processing: resize to multiples of 28, patches in merge order
  tokenizer.py   byte-level BPE with the vision special tokens (`python -m trainer.tokenizer`)
  formatters.py  one formatter per shard kind: sample -> token ids + images
  packing.py     next-fit packing into fixed rows, labels on text only, 3D-RoPE positions
  data.py        the loader: mixing, shuffling, rank/worker split, with_epoch, exact resume
  model.py       ViT with 2D-RoPE, 2x2 merger + projector, decoder LM with 3D-RoPE
  train.py       the loop: AdamW, schedule, accumulation, clipping, DDP, checkpoints
  __main__.py    `python -m trainer` flags
"""
