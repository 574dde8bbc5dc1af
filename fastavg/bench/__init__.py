"""fastavg-bench: every fused update against the stock PyTorch paths and the bandwidth limit."""
