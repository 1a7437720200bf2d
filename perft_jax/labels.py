"""The label conventions every layer shares (bottom of the package: data writes them, the losses read them)."""

# Label of a token the loss ignores (the HF / PyTorch `CrossEntropyLoss` convention, README §2).
IGNORE_INDEX = -100
