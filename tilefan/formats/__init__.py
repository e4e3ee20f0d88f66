"""Image formats: opening inputs safely, and writing outputs."""
