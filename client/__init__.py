"""Thin client: library, `nextchar` CLI and batch jobs. Needs only grpcio and protobuf."""

from .client import NextCharClient, NextCharError, prediction_to_dict

__all__ = ["NextCharClient", "NextCharError", "prediction_to_dict"]
