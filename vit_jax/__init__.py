"""ViT Mirror, JAX/Flax side: the official ViT in Flax linen, its training and evaluation."""
