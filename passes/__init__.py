"""graphprune.passes: rewrite passes over torch.fx GraphModules (each in its own module)."""
