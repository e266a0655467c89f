"""Model accounting, attention/embedding views, run reports."""
