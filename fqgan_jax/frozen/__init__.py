"""Never-trained networks (LPIPS, FID Inception, CLIP and DINOv2 teachers) and their weights I/O."""
