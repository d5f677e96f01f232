"""Drop-in classes matching open_clip, SupContrast and pytorch-metric-learning."""
