"""Everything between files on disk and the batches the engines consume: sources, splits, checks, slices."""
