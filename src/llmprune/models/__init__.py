"""Everything that knows about model architectures lives in this package."""
