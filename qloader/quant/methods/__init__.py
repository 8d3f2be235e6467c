"""The method plug-ins: one module per method family, each registering itself with `register_method`."""
