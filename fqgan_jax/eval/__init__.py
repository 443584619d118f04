"""Evaluation: the eval pass, image metrics, FID / IS, grids and the codebook analysis."""
