"""Pydantic job specs that cross the process boundary between an operator and the job runtime."""
