"""Model builders and loaders: synthesis (FLUX), tiny random models for CPU runs and tests."""
