"""cdjax: coupled diffusion models of signals and logits, and Ex-Diff speech enhancement, in JAX."""
