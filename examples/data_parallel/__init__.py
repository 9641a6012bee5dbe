"""Data-parallel demos: inference split over ranks, gradient sync, a transformer, throughput."""
