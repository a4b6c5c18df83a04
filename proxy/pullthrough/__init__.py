"""The pull-through services: what the API asks, per upstream and repository."""
