"""Checkpoints from elsewhere into DW models: the paper's original training code (`original_checkpoint`, with the
key maps in `original_keys`) and `transformers` ViT/Swin (`from_transformers`, key maps in `transformers_keys`)."""
