"""Streaming server for exec, attach and port-forward."""
