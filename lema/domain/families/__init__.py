"""One module per model family (tensor names, shapes, LoRA targets) and the registry that lists them."""
