"""lars: LARS, TVLARS and LAMB for large-batch training."""
