"""Training data: sources, formats, chat templates, token stores, caching, packing, batching; the shipped demo data."""
