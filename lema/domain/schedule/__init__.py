"""The layer schedule: the ordered fetch / compute / release steps of a pass."""
