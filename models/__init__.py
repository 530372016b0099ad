"""The model side of toyllm: config, Llama blocks, checkpoints, tokenizer, shipped default."""
