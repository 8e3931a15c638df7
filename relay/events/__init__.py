"""The events stage: what SendCloud's webhooks tell about each recipient after the 250."""
