"""Scheduling: which queued job runs next, and how many at once."""
