"""Data parallelism over torch.distributed: the process group, gradient buckets, rank agreement."""
