"""The memory plan: inputs, items, the planner, recommendations and the words that explain it."""
