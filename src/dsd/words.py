"""Counts in user-facing text: "1 row", "2 rows", "0.75 epochs" (no "1 rows")."""


def counted(n: float, noun: str, plural: str | None = None) -> str:
    """`n` and the noun, singular for exactly one; a float count as `:g` writes it (1.0 is "1 epoch")."""
    number = f"{n:g}" if isinstance(n, float) else str(n)
    return f"{number} {noun if n == 1 else plural or noun + 's'}"
