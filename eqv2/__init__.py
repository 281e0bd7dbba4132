"""eqv2: EquiformerV2 interatomic potentials trained at cluster scale with DeepSpeed."""
__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """Load a ready-to-use model from an eqv2 checkpoint (see `eqv2.checkpoint`)."""
    from eqv2.checkpoint import load_model as _load

    return _load(path, device=device)
