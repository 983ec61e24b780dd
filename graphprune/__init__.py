"""graphprune: verified structural pruning and sparsity for PyTorch models."""
