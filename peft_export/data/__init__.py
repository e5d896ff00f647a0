"""Real sample data and folder datasets (torch-free)."""
