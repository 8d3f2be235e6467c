"""What a load costs and holds: memory samplers, environment, inventory, plan, weights fingerprint."""
