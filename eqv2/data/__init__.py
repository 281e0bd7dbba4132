"""eqv2 data: sharded WebDataset OC20 streams (see docs/data.md)."""
