"""The pure core: values and arithmetic only, no file, device, clock or environment access."""
