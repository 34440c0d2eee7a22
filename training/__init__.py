"""Training and export of the character-level models. Needs `nextchar[train]`."""
