"""fastavg-train: a nanoGPT-style GPT-2 trainer comparing raw weights with EMA, SWA and LAWA."""
