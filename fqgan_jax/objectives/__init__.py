"""The tokenizer's training objective: reconstruction, VQ, disentanglement, InfoNCE and the GAN."""
