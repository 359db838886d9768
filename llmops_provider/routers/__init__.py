"""Serving backends of a rollout: where replicas run and how traffic is split between them."""
