"""Impetus: an outbound MTA speaking Momentum ecelerity.conf."""
__version__ = "0.1.0"
