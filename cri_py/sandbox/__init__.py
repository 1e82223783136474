"""Pod sandboxes: pause container, network namespace, sandbox files and status."""
