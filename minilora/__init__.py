"""minilora: parameter-efficient fine-tuning from scratch in plain PyTorch."""
