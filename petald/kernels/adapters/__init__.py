"""LoRA adapters: reading PEFT adapters and applying them to a block's projections."""
