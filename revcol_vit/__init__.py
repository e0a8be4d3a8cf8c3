"""RevCol-ViT models registered with timm."""
