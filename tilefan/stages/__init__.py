"""The pipeline stages: split, process tiles, merge, abort. No Lambda events here."""
