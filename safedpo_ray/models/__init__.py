"""Models: loading policies, references and tokenizers (tiny preset, LoRA, export), and score models."""
