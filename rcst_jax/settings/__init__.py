"""The run config: files by name or path with variants, and the schema that checks them."""
