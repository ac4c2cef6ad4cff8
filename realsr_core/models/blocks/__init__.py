"""Building blocks shared by several methods (each sub-module holds one family)."""
