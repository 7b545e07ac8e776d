"""qlora_pipe: recipe → NF4 base → all-linear LoRA → TRL SFT → verified dequantize-merge."""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix (bad recipe, missing file, wrong base). The CLI prints it and exits with status 2."""
