"""Lightning callbacks: sample grids (image_logger), checkpoint safety (checkpointing), throughput."""
