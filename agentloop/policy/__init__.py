"""Policies: turn formats, model loading and generation backends."""
