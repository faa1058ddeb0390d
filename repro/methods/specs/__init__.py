"""One torch-free ``MethodSpec`` per method (``repro.methods.registry`` imports every module here)."""
