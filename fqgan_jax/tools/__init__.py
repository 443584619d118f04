"""Command-line tools: converters from official PyTorch weights to fqgan_jax files."""
