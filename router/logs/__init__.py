"""Conversation log store: every exchange through the gateway, plus feedback, as training material."""
