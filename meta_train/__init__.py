"""Meta-training of nfopt's learned optimizer: the task distribution and the unrolled training loop."""
