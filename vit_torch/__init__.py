"""ViT Mirror, PyTorch side: the mirror of `vit_jax`'s model, evaluation and conversion."""
