"""Training layer: soft prompts and the fine-tuned reference, over the core inference modules."""
