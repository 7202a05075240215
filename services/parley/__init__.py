"""Parley: a horizontally scaled real-time chat service."""

__version__ = "0.1.0"
