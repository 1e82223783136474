"""The kubelet CRI log format writer."""
