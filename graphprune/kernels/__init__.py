"""graphprune.kernels: sparse CPU kernels (1xN) and sparse masks (2:4, 1xN)."""
