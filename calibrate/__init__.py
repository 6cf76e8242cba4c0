"""Router training and threshold selection (torch side)."""
