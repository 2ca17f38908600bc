"""Bridges to other libraries, each imported on its own (``import
attngraph.integrations.transformers``) so that ``import attngraph`` never needs them."""
