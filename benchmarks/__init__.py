"""Side-by-side benchmarks of Wicket's relay: ``./dev bench`` (see README.md)."""
