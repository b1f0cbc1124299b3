"""Training: the model facade, the trainer, the run loop and run_training (the use case behind lema train)."""
