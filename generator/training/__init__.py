"""Training: generators by reconstruction (`train`) and by SFT through the base model (`sft`),
oracle LoRAs (`oracles`), the batched multi-adapter base model (`multilora`), prompts (`prompts`)."""
