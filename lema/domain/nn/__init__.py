"""Shared tensor math below the families: BlockContext, attention, linear maps, norms, rope, experts, options."""
