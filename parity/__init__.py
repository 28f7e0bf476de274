"""ViT Mirror, framework-neutral core: configs, the shared weight layer, the parity harness."""
